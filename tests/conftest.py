"""Shared test configuration.

Eight host devices are forced before JAX initialises so that sharding tests can build meshes on CPU.
XLA:CPU compiles at -O0 (``tests.processes.FAST_COMPILE``). Strict rank promotion catches silent broadcasting bugs (as equinox's suite does).
"""

import os
import tempfile

from tests.processes import FAST_COMPILE

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, shared by the xdist workers and by the
# subprocesses some tests start: identical programs (a run and its resumed twin, the same step
# rebuilt by another test) compile once. Per session, so timings stay those of a clean machine.
_session = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"memjax-test-jax-cache-{_session}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort): xdist hands them out before the short ones, so no long
    test starts last on one worker while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
