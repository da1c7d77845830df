"""Typed, frozen run configurations; every field can be overridden from the command line (tyro).

A :class:`Config` describes one experiment: a model, one or more optimizers trained side by side on
the same data with the same seed, the data, the device mesh, the learning-rate schedule, evaluation,
checkpointing and logging. Named experiments live in ``experiments/configs/<name>.py`` as a module
constant ``CONFIG``; ``python -m experiments.train --config <name> --model.d-model 128`` overrides any
field.

Each optimizer recipe has its own config class with its own fields and its authors' defaults
(:mod:`experiments.recipes`); adding a recipe means one class there and one builder in
``experiments.optimizers.RECIPES``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

from .recipes import (RECIPE_CLASSES, GradientConfig, MezoConfig,  # noqa: F401 (re-exports)
                      OptimizerConfig, OptimizerName, optimizer_fields)

DataSourceName = Literal["stdlib", "text", "tokens", "selective_copy", "mqar", "hf"]


class ConfigError(ValueError):
    """A configuration (or a run directory) that cannot be run; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The decoder LM (memjax.models.lm.LMConfig); its max_length is the data's seq_len."""

    vocab_size: int = 256
    """Tokens; 256 for byte-level data. Must exceed every token id of the data."""
    d_model: int = 64
    """Model width."""
    num_layers: int = 2
    """Decoder blocks (stacked, run with lax.scan)."""
    num_heads: int = 4
    """Heads of the mixer; must divide d_model."""
    ffn_dim: int = 172
    """Hidden width of the SwiGLU MLP."""
    mixer: str = "attention"
    """Sequence mixer: attention | mamba | linear | combiner | scatterbrain."""
    remat: str = "none"
    """Rematerialisation policy: none | full | selective."""
    tie_embeddings: bool = False
    """Share the embedding with the output head."""
    dtype: str = "float32"
    """Activation dtype."""
    param_dtype: str = "float32"
    """Parameter dtype."""
    init_from: str = ""
    """Start from a local Hugging Face LlamaForCausalLM / Qwen2ForCausalLM checkpoint folder
    (config.json + *.safetensors): the shape fields above come from it (leave them unset, or set
    them to the checkpoint's values); the attention options (grouped-query heads, rope_theta,
    biases, RMSNorm epsilon) too. Empty: train from scratch."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from (see experiments.data)."""

    source: DataSourceName = "stdlib"
    """stdlib (bytes of Python's own sources + pydoc topics) | text (paths, bytes) | tokens (paths,
    .npy / .bin) | selective_copy | mqar (synthetic, from the seed) | hf (a Hugging Face dataset's
    text as bytes; needs pip install datasets)."""
    paths: tuple[str, ...] = ()
    """Files of the text / tokens sources; for hf, the data_files of a packaged builder (json, csv)."""
    hf_path: str = ""
    """hf: a Hub dataset name, a packaged builder (json, csv, text, parquet) or a local directory
    (one written by save_to_disk included)."""
    hf_name: str = ""
    """hf: the dataset's configuration name; empty: its default."""
    hf_split: str = "train"
    """hf: the split read (then cut into train / validation by val_fraction)."""
    hf_column: str = "text"
    """hf: the text column."""
    token_dtype: str = "uint16"
    """dtype of raw .bin token files."""
    seq_len: int = 128
    """Tokens per sequence (the model's max_length)."""
    batch_size: int = 16
    """Sequences per optimizer step (all devices, all accumulation micro-steps)."""
    max_corpus_bytes: int = 4_000_000
    """Cap on the stdlib corpus size (the first sorted files up to the cap)."""
    val_fraction: float = 0.05
    """Share of the corpus held out for validation."""
    num_tokens_to_copy: int = 8
    """selective_copy: data tokens to copy."""
    num_kv_pairs: int = 8
    """mqar: key-value pairs per sequence."""
    tokenizer: str = ""
    """Tokenise the text sources (stdlib, text, hf) with a Hugging Face tokenizer.json: its path,
    or "checkpoint" for the one in model.init_from. Empty: bytes (token id = byte)."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """A 2-D device mesh (data, fsdp); -1 takes the remaining devices."""

    data: int = -1
    """Data-parallel axis size (batch only)."""
    fsdp: int = 1
    """Fully-sharded axis size (batch and parameters / optimizer state)."""
    rules: tuple[tuple[str, str], ...] = (("embed", "fsdp"),)
    """Logical parameter axis -> mesh axis; unnamed logical axes are replicated."""


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Steps, learning-rate schedule (GaLore-style warmup + cosine), accumulation, clipping."""

    steps: int = 300
    """Optimizer steps."""
    warmup_fraction: float = 0.1
    """Linear warmup over this fraction of the steps."""
    final_lr_fraction: float = 0.1
    """Cosine decay to this fraction of the peak learning rate."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (batch_size must be divisible by it)."""
    clip_norm: float = 1.0
    """Global gradient-norm clipping; 0 disables it."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Validation loss every `every` steps (and at the last step) on fixed held-out batches."""

    every: int = 50
    """Evaluate every this many steps; 0: only at the end."""
    batches: int = 4
    """Validation batches (of data.batch_size sequences)."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing (async, atomic)."""

    every: int = 100
    """Save every this many steps (and at the last step); 0: only at the end."""
    max_to_keep: int = 2
    """Checkpoints kept."""
    async_save: bool = True
    """Write checkpoints in the background."""
    resume: bool = True
    """Resume from the latest checkpoint of the run directory if there is one."""
    stop_after: int = 0
    """Stop (after saving) once this step is reached, as if preempted; 0: never."""
    overwrite: bool = False
    """Start the run again from step 0, deleting its checkpoints and metrics, instead of
    resuming it (or refusing a changed config)."""
    max_skipped_steps: int = 20
    """Stop the run with an error after this many consecutive skipped steps (non-finite loss or
    gradients); no checkpoint is written while steps are skipped. 0: never stop."""
    export_hf: bool = False
    """At the end of a run, write the trained model as a Hugging Face checkpoint folder
    (<run>/hf: config.json, model.safetensors and the tokenizer.json used, if any) that
    transformers loads (attention models with float weights)."""


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Outputs."""

    output_dir: str = "runs"
    """Runs go to <output_dir>/<config name>/<optimizer label>/."""
    log_every: int = 10
    """Fetch metrics from the device and append them to metrics.jsonl every this many steps."""
    progress: bool = True
    """Show a tqdm progress bar."""
    plots: bool = True
    """Write loss and memory plots (PNG) after the runs."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard event files under <run>/tensorboard (needs
    pip install tensorboardX)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs (jax.distributed.initialize); empty address: one process."""

    coordinator_address: str = ""
    """host:port of process 0, e.g. localhost:12345."""
    num_processes: int = 1
    """Processes taking part."""
    process_id: int = 0
    """This process's index."""


@dataclasses.dataclass(frozen=True)
class Config:
    """An experiment: every optimizer in `optimizers` trains the same model on the same data."""

    name: str = "default"
    """Experiment name (the run directory under log.output_dir)."""
    seed: int = 0
    """Seeds the model initialisation, the data order and the PRNG state."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizers: tuple[OptimizerConfig, ...] = (OptimizerConfig(),)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    select: tuple[str, ...] = ()
    """Train only the optimizers with these labels (default: all)."""
    memory_presets: tuple[str, ...] = ()
    """After training, print the shape-only memory of one train step of every optimizer at these
    model presets (memjax.models.lm.PRESETS, e.g. llama_1b llama_7b) at the GaLore paper's setting:
    float32, one 256-token sequence, the authors' rank (experiments.memory.at_preset)."""

    @property
    def selected(self) -> tuple[OptimizerConfig, ...]:
        """The optimizers this invocation trains."""
        if not self.select:
            return self.optimizers
        return tuple(o for o in self.optimizers if o.display_name in self.select)


# Sections that must match for a checkpoint to be resumed exactly (mesh, eval, checkpoint and
# log settings may change between a run and its resumption).
RESUME_SECTIONS = ("seed", "model", "data", "schedule")


def from_json_dict(cls: type, data: dict) -> Any:
    """The dataclass ``cls`` built from :func:`to_json_dict` output (nested dataclasses and tuples
    restored from their JSON types).

    For :class:`OptimizerConfig`, the class of the recipe ``data["name"]``; keys of other recipes'
    fields are dropped, and ``null`` for a field whose default is not ``None`` reads as that
    default (a run directory written when every optimizer had every field and ``null`` meant
    "the recipe's default": :func:`legacy_optimizer`).

    Raises:
      ConfigError: a key that is not a field of ``cls``, or an unknown recipe name.
    """
    if cls is OptimizerConfig:
        name = data.get("name", "adamw")
        if name not in RECIPE_CLASSES:
            raise ConfigError(f"unknown optimizer name {name!r}; available: "
                              f"{', '.join(RECIPE_CLASSES)}")
        cls, data = RECIPE_CLASSES[name], legacy_optimizer(data)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _from_json(hints[name], value) for name, value in data.items()})


def legacy_optimizer(data: dict) -> dict:
    """An optimizer's JSON data with the fields of other recipes dropped and ``null`` values of
    fields that have a non-``None`` default dropped (both written by the flat config of earlier
    versions); unknown keys are kept (for the caller's error)."""
    name = data.get("name", "adamw")
    if name not in RECIPE_CLASSES:
        return data
    own = {f.name: f.default for f in dataclasses.fields(RECIPE_CLASSES[name])}
    others = {f for n in RECIPE_CLASSES for f in optimizer_fields(n)}
    return {k: v for k, v in data.items()
            if (k in own and not (v is None and own[k] is not None)) or k not in others}


def _from_json(tp: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_json_dict(tp, value)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v) for v in value)
        return tuple(_from_json(a, v) for a, v in zip(args, value))
    return value


def run_config(path: str) -> Config:
    """The config of one saved run (its ``config.json``): the experiment with only that run's
    optimizer. Training it again reproduces the run's metrics exactly on CPU."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read the run config {path}: {err}") from None
    if not isinstance(data, dict) or "optimizer" not in data:
        raise ConfigError(f"{path} is not a run's config.json (no 'optimizer' entry)")
    optimizer = from_json_dict(OptimizerConfig, data.pop("optimizer"))
    return dataclasses.replace(from_json_dict(Config, data), optimizers=(optimizer,), select=())


def to_json_dict(config: Any) -> dict:
    """A dataclass as plain JSON data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def resume_fingerprint(config: Config, optimizer: OptimizerConfig) -> dict:
    """The parts of a run's config that a checkpoint must agree with, as JSON data."""
    full = to_json_dict(config)
    out = {k: full[k] for k in RESUME_SECTIONS}
    out["optimizer"] = to_json_dict(optimizer)
    return out


def normalized_fingerprint(saved: dict) -> dict:
    """A checkpoint's saved fingerprint with its optimizer read as the current recipe classes
    read it (:func:`legacy_optimizer`): a checkpoint of an earlier version's flat optimizer
    config resumes when its recipe's fields agree."""
    if isinstance(saved.get("optimizer"), dict):
        try:
            optimizer = from_json_dict(OptimizerConfig, saved["optimizer"])
        except (ConfigError, TypeError, ValueError):
            return saved
        return {**saved, "optimizer": to_json_dict(optimizer)}
    return saved


def fingerprint_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``["model.d_model: saved 64, now 32", ...]`` for every leaf that differs."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(fingerprint_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return diffs


def _weight_format_error(m: ModelConfig, o: OptimizerConfig) -> str | None:
    """Why the model cannot hold ``o``'s INT8 weights (group size, mixer), or ``None``; a model
    that is invalid anyway is the model's error (``run.lm_config``: ``"model: ..."``)."""
    if o.weight_bits != 8:
        return None
    from memjax.models.lm import LMConfig

    shape = (m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.ffn_dim)
    try:
        LMConfig(*shape, mixer=m.mixer)
    except ValueError:
        return None
    try:
        LMConfig(*shape, mixer=m.mixer, weight_bits=8, weight_group_size=o.weight_group_size,
                 weight_rounding=o.weight_rounding)
    except ValueError as err:
        return str(err)
    return None


_CHECKPOINT_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim", "mixer",
                      "tie_embeddings")


def checkpoint_lm_config(m: ModelConfig):
    """The :class:`memjax.models.lm.LMConfig` of the checkpoint ``m.init_from`` in
    ``m.param_dtype``; an unreadable or unsupported checkpoint is a :class:`ConfigError`."""
    from . import hf_checkpoint

    try:
        return hf_checkpoint.config_from_hf(hf_checkpoint.read_config(m.init_from),
                                            dtype=m.param_dtype)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"model.init_from={m.init_from!r}: {err}") from None


def resolve_model(config: Config) -> Config:
    """``config`` with, when ``model.init_from`` names a checkpoint, the model's shape fields
    taken from its ``config.json``; a field already set to another value raises
    :class:`ConfigError` naming it (so a re-run from a run's saved config.json keeps working)."""
    m = config.model
    if not m.init_from:
        return config
    lm = checkpoint_lm_config(m)
    theirs = {f: getattr(lm, f) for f in _CHECKPOINT_FIELDS}
    defaults = ModelConfig()
    for field, value in theirs.items():
        ours = getattr(m, field)
        if ours != getattr(defaults, field) and ours != value:
            raise ConfigError(f"model.{field}={ours!r} disagrees with the checkpoint "
                              f"{m.init_from} ({field}={value!r}); leave it unset")
    return dataclasses.replace(config, model=dataclasses.replace(m, **theirs))


def validate(config: Config) -> None:
    """Raises :class:`ConfigError` for settings that cannot run (devices are checked elsewhere)."""
    s, d = config.schedule, config.data
    checks = [
        (config.optimizers, "optimizers must name at least one optimizer"),
        (s.steps >= 1, f"schedule.steps={s.steps} must be >= 1"),
        (0 <= s.warmup_fraction < 1, f"schedule.warmup_fraction={s.warmup_fraction} must be in [0, 1)"),
        (0 <= s.final_lr_fraction <= 1,
         f"schedule.final_lr_fraction={s.final_lr_fraction} must be in [0, 1]"),
        (s.grad_accum >= 1, f"schedule.grad_accum={s.grad_accum} must be >= 1"),
        (s.clip_norm >= 0, f"schedule.clip_norm={s.clip_norm} must be >= 0"),
        (d.seq_len >= 2, f"data.seq_len={d.seq_len} must be >= 2"),
        (d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1"),
        (d.batch_size % s.grad_accum == 0,
         f"data.batch_size={d.batch_size} is not divisible by schedule.grad_accum={s.grad_accum}"),
        (0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in (0, 1)"),
        (config.eval.every >= 0 and config.eval.batches >= 1,
         "eval.every must be >= 0 and eval.batches >= 1"),
        (config.checkpoint.every >= 0 and config.checkpoint.max_to_keep >= 1,
         "checkpoint.every must be >= 0 and checkpoint.max_to_keep >= 1"),
        (config.checkpoint.max_skipped_steps >= 0,
         f"checkpoint.max_skipped_steps={config.checkpoint.max_skipped_steps} must be >= 0"),
        (config.log.log_every >= 1, f"log.log_every={config.log.log_every} must be >= 1"),
        (d.source not in ("text", "tokens") or d.paths, f"data.source={d.source!r} needs data.paths"),
        (d.source != "hf" or d.hf_path, "data.source='hf' needs data.hf_path"),
        (not d.tokenizer or d.source in ("stdlib", "text", "hf"),
         f"data.tokenizer tokenises text; data.source={d.source!r} is not text"),
        (d.tokenizer != "checkpoint" or config.model.init_from,
         "data.tokenizer='checkpoint' needs model.init_from"),
        (not config.checkpoint.export_hf or config.model.mixer == "attention",
         f"checkpoint.export_hf needs the attention mixer, not {config.model.mixer!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    from memjax.models.lm import PRESETS

    unknown_presets = [p for p in config.memory_presets if p not in PRESETS]
    if unknown_presets:
        raise ConfigError(f"memory_presets names unknown model presets {unknown_presets}; "
                          f"available: {', '.join(PRESETS)}")
    labels = [o.display_name for o in config.optimizers]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"optimizer labels must be unique, got {labels}; set optimizers.N.label")
    unknown = [x for x in config.select if x not in labels]
    if unknown:
        raise ConfigError(f"select names unknown optimizer labels {unknown}; the config has {labels}")
    dist = config.distributed
    if dist.num_processes < 1 or not 0 <= dist.process_id < dist.num_processes:
        raise ConfigError(f"distributed: process_id={dist.process_id} must be in [0, num_processes="
                          f"{dist.num_processes})")
    for o in config.optimizers:
        _validate_optimizer(config, o)


def _validate_optimizer(config: Config, o: OptimizerConfig) -> None:
    """Raises :class:`ConfigError` for settings of ``o`` that cannot run in ``config``."""
    if not isinstance(o, OptimizerConfig):
        raise ConfigError(f"optimizers holds {o!r}; build each with OptimizerConfig(name=...)")
    if o.learning_rate <= 0:
        raise ConfigError(f"optimizer {o.display_name}: learning_rate must be > 0")
    if isinstance(o, MezoConfig):
        if o.zo_shared_seed and config.mesh.fsdp != 1:
            raise ConfigError(f"optimizer {o.display_name}: zo_shared_seed replicates the "
                              f"parameters; set mesh.fsdp=1 (got {config.mesh.fsdp})")
        if not (0 < o.zo_eps < float("inf") and isinstance(o.zo_samples, int)
                and o.zo_samples >= 1):
            raise ConfigError(f"optimizer {o.display_name}: zo_eps={o.zo_eps} must be a finite "
                              f"number > 0 and zo_samples={o.zo_samples} an int >= 1")
        return
    if not isinstance(o, GradientConfig):
        return
    if o.weight_bits == 8 and (config.model.init_from or config.checkpoint.export_hf):
        raise ConfigError(f"optimizer {o.display_name}: weight_bits=8 with model.init_from "
                          "or checkpoint.export_hf is not supported (float checkpoints)")
    if o.weight_bits not in (32, 8):
        raise ConfigError(f"optimizer {o.display_name}: weight_bits={o.weight_bits!r} must be "
                          f"32 (float) or 8 (INT8)")
    error = _weight_format_error(config.model, o)
    if error:
        raise ConfigError(f"optimizer {o.display_name}: {error}")
    if getattr(o, "adam_bits", 32) not in (32, 8):
        raise ConfigError(f"optimizer {o.display_name}: adam_bits={o.adam_bits!r} must be 32 or 8")
    if o.name == "frugal" and not 0 < o.density <= 1:
        raise ConfigError(f"optimizer {o.display_name}: density={o.density} must be in (0, 1]")
    if hasattr(o, "rank") and o.rank >= min(config.model.d_model, config.model.ffn_dim):
        raise ConfigError(
            f"optimizer {o.display_name}: rank={o.rank} must be smaller than "
            f"min(model.d_model, model.ffn_dim)={min(config.model.d_model, config.model.ffn_dim)}")
