"""memjax.optim: memory-lean optimizers as optax ``GradientTransformation`` s.

Recipes (complete optimizers, like ``optax.adamw``):
  :func:`galore`

Building blocks:
  :func:`scale_by_low_rank` (the projected transform), :mod:`projectors`, :mod:`residual`,
  :func:`scale_by_hf_adam`, :func:`skip_nonfinite`, :func:`add_decayed_weights_after_step`,
  :func:`label_matrices` / :class:`MatrixDims` (which leaves are matrices).

Accounting:
  :func:`state_bytes`, :func:`compiled_memory`.
"""

from memjax.optim import projectors, residual
from memjax.optim.accounting import CompiledMemory, compiled_memory, state_bytes
from memjax.optim.adam import ScaleByHFAdamState, scale_by_hf_adam
from memjax.optim.aliases import galore
from memjax.optim.guards import SkipNonFiniteState, all_finite, skip_nonfinite
from memjax.optim.labels import DEFAULT_EXCLUDE, MatrixDims, label_matrices, resolve_labels
from memjax.optim.low_rank import LowRankState, scale_by_low_rank
from memjax.optim.projectors import Projector, canonicalize_signs, dct_basis, make_projector
from memjax.optim.residual import ResidualPolicy
from memjax.optim.sharding import state_shardings
from memjax.optim.weight_decay import add_decayed_weights_after_step

__all__ = [
    "CompiledMemory",
    "DEFAULT_EXCLUDE",
    "LowRankState",
    "MatrixDims",
    "Projector",
    "ResidualPolicy",
    "ScaleByHFAdamState",
    "SkipNonFiniteState",
    "add_decayed_weights_after_step",
    "all_finite",
    "canonicalize_signs",
    "compiled_memory",
    "dct_basis",
    "galore",
    "label_matrices",
    "make_projector",
    "projectors",
    "residual",
    "resolve_labels",
    "scale_by_hf_adam",
    "scale_by_low_rank",
    "skip_nonfinite",
    "state_bytes",
    "state_shardings",
]
