"""The training loop's hooks: one per concern, each deciding its own schedule.

:func:`experiments.run.train` dispatches steps and, every ``log.log_every`` steps (and whenever a
hook is due), fetches a :class:`Window` of step metrics from the device and hands it to each hook
in turn: evaluation, the metrics log, the skipped-step guard, the shared-seed replay log,
checkpoints, the progress bar. A hook may stop the run by raising :class:`RunStopped`. This is
levanter's loop shape (a generator of steps plus hooks; checkpointing is a hook that decides its
own frequency) without its callback registry: the list is built in one place,
:func:`default_hooks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

from . import checkpointing, metrics, trainer


class RunStopped(RuntimeError):
    """A run that cannot go on (it stopped learning); the message says why and what is kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, taken between steps: ``step`` steps are done."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Ctrl-C (SIGINT) only sets a flag, which the loop reads between steps: an interrupt never
    lands inside a checkpoint save or a device call. A second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    received = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous)


def due(step: int, every: int, last: int) -> bool:
    """``step`` is the last one, or a multiple of ``every`` (> 0)."""
    return step == last or (every > 0 and step % every == 0)


@dataclasses.dataclass
class Window:
    """Steps ``step - len(host) + 1 .. step``, fetched from the device at once.

    Attributes:
      step: the window's last step.
      state: the train state after ``step``.
      host: per step, its metrics as Python numbers (loss, grad_norm, lr, skipped).
      step_records: per step, what the step left for the hooks (a shared-seed replay entry).
      step_time: seconds per step over the window (dispatch to fetch, evaluation excluded).
      records: the ``metrics.jsonl`` records of the window (train, then val if evaluated).
    """

    step: int
    state: Any
    host: list[dict]
    step_records: list[Any]
    step_time: float
    records: list[dict]


class Hook:
    """Does nothing; subclasses override what they need."""

    def due(self, step: int) -> bool:
        """Whether a window must end at ``step`` for this hook."""
        del step
        return False

    def on_window(self, window: Window) -> None:
        """Called for every fetched window, in hook order."""

    def close(self) -> None:
        """Called once when the loop ends, normally or not."""


class Evaluation(Hook):
    """Validation loss on fixed held-out batches every ``every`` steps and at ``last``."""

    def __init__(self, tr: trainer.Trainer, batches: list, every: int, last: int,
                 say: Callable[[str], None], label: str):
        self.tr, self.batches, self.every, self.last = tr, batches, every, last
        self.say, self.label = say, label

    def due(self, step: int) -> bool:
        return due(step, self.every, self.last)

    def on_window(self, window: Window) -> None:
        if not self.due(window.step):
            return
        loss = sum(float(self.tr.eval_loss(window.state.params, b))
                   for b in self.batches) / len(self.batches)
        window.records.append({"step": window.step, "split": "val", "loss": loss})
        self.say(f"[{self.label}] step {window.step}: validation loss {loss:.4f}")


class MetricsLog(Hook):
    """Appends the window's records to ``metrics.jsonl`` (and TensorBoard event files)."""

    def __init__(self, path: pathlib.Path, board: metrics.TensorBoard | None):
        self.path, self.board = path, board

    def on_window(self, window: Window) -> None:
        metrics.append(self.path, window.records)
        if self.board is not None:
            self.board.append(window.records)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class SkipGuard(Hook):
    """Stops a run after ``limit`` consecutive skipped steps (non-finite loss or gradients: a
    skipped step changes neither the parameters nor the optimizer state). ``limit`` 0: never."""

    def __init__(self, limit: int, label: str, checkpoint: Checkpoint):
        self.limit, self.label, self.checkpoint = limit, label, checkpoint
        self.streak = 0

    def on_window(self, window: Window) -> None:
        for h in window.host:
            self.streak = self.streak + 1 if h.get("skipped") else 0
        if self.limit and self.streak >= self.limit:
            kept = (f"its last checkpoint (step {self.checkpoint.last}) is kept"
                    if self.checkpoint.last else "no checkpoint was written")
            raise RunStopped(
                f"[{self.label}] {self.streak} consecutive steps skipped up to step "
                f"{window.step} (non-finite loss, gradients or updates): the run stopped "
                f"learning (lower the learning rate); {kept}. checkpoint.max_skipped_steps sets "
                "the limit.")


class ReplayLog(Hook):
    """The shared-seed MeZO replay log: one entry per step, written before each checkpoint."""

    def __init__(self, log, path: pathlib.Path, checkpoint: Checkpoint, primary: bool,
                 save: Callable[[pathlib.Path, Any], None]):
        self.log, self.path, self.checkpoint = log, path, checkpoint
        self.primary, self.save = primary, save

    def on_window(self, window: Window) -> None:
        import memjax

        for record in window.step_records:
            entry = trainer.replay_entry(record)
            if self.log is None:
                self.log = memjax.optim.ReplayLog.empty(*entry.codes.shape)
            self.log = self.log.append(entry)
        if self.checkpoint.due(window.step) and self.primary:
            self.save(self.path, self.log)


class Checkpoint(Hook):
    """Saves the state and the data position every ``every`` steps and at ``last``, except while
    steps are being skipped under a guard with a limit (its streak), so the newest checkpoint is a
    learning one; the last step is always saved."""

    def __init__(self, mngr, every: int, last: int, start: int, meta: Callable[[], dict]):
        self.mngr, self.every, self.last_step, self.meta = mngr, every, last, meta
        self.last = start
        self.guard: SkipGuard | None = None
        self._open = True

    def due(self, step: int) -> bool:
        return due(step, self.every, self.last_step)

    def on_window(self, window: Window) -> None:
        if not self.due(window.step) or self._skipping(window.step):
            return
        checkpointing.save(self.mngr, window.step, window.state, self.meta())
        self.last = window.step

    def _skipping(self, step: int) -> bool:
        """Steps are being skipped under a guard that will stop the run (the last step is
        always saved: a run that reached it is finished)."""
        g = self.guard
        return g is not None and bool(g.limit) and g.streak > 0 and step != self.last_step

    def close(self) -> None:
        """Waits for a save in flight, then closes the manager (once)."""
        if self._open:
            self._open = False
            self.mngr.wait_until_finished()
            self.mngr.close()


class Progress(Hook):
    """The tqdm bar: steps, loss, tokens / s and ms / step of the last window."""

    def __init__(self, bar: tqdm, tokens_per_step: int):
        self.bar, self.tokens_per_step = bar, tokens_per_step

    def on_window(self, window: Window) -> None:
        self.bar.update(len(window.host))
        self.bar.set_postfix(loss=f"{window.host[-1]['loss']:.3f}",
                             tok_s=f"{self.tokens_per_step / window.step_time:,.0f}",
                             step_ms=f"{1e3 * window.step_time:.1f}")

    def close(self) -> None:
        self.bar.close()


def train_records(window_host: list[dict], last_step: int, step_time: float,
                  tokens_per_step: int, warm: bool) -> list[dict]:
    """The window's ``"train"`` records; ``warm`` is False for the first window of a process
    (it holds the compilation); ``load`` is the 1-minute load average at the window's end."""
    first = last_step - len(window_host) + 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return [{"step": first + i, "split": "train", **h, "step_time": step_time,
             "tokens_per_s": tokens_per_step / step_time, "warm": warm, "load": load}
            for i, h in enumerate(window_host)]
