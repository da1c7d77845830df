"""Memory accounting: bytes held by a state pytree, and the compiled memory of a jitted step.

Compiled memory comes from XLA's buffer assignment
(``jax.jit(f).lower(*args).compile().memory_analysis()``), which works on every backend,
CPU included, and is deterministic: it is the figure memjax's benchmarks quote.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np


def state_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree`` (arrays or ``jax.ShapeDtypeStruct`` s).

    Typed PRNG key arrays count their underlying key data. Non-array leaves count 0.

    Example:
      >>> import jax.numpy as jnp
      >>> state_bytes({"m": jnp.zeros((4, 8)), "c": jnp.zeros([], jnp.int32)})
      132
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            continue
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            total += state_bytes(jax.eval_shape(jax.random.key_data, leaf))
            continue
        total += math.prod(shape) * np.dtype(dtype).itemsize
    return int(total)


class CompiledMemory(NamedTuple):
    """XLA's memory figures for one compiled computation, in bytes.

    Attributes:
      argument: bytes of the inputs.
      output: bytes of the outputs.
      alias: bytes of outputs that reuse (donated) input buffers.
      temp: bytes of temporaries (activations, workspace).
      generated_code: bytes of the executable.
      peak: ``argument + output - alias + temp``, the live bytes the step needs.
    """

    argument: int
    output: int
    alias: int
    temp: int
    generated_code: int

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp


def compiled_memory(fn: Callable, *args, donate_argnums=(), **kwargs) -> CompiledMemory:
    """Compiles ``fn(*args, **kwargs)`` with ``jax.jit`` and reads its memory analysis.

    Args:
      fn: a function, or an already ``jax.jit``-ed one (then ``donate_argnums`` is ignored).
      *args, **kwargs: example arguments (arrays or ``jax.ShapeDtypeStruct`` s).
      donate_argnums: passed to ``jax.jit``.

    Returns:
      A :class:`CompiledMemory`.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, donate_argnums=donate_argnums)
    analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
    if analysis is None:
        raise RuntimeError("this backend reports no memory analysis for compiled computations.")
    return CompiledMemory(
        argument=int(analysis.argument_size_in_bytes),
        output=int(analysis.output_size_in_bytes),
        alias=int(analysis.alias_size_in_bytes),
        temp=int(analysis.temp_size_in_bytes),
        generated_code=int(analysis.generated_code_size_in_bytes),
    )
