"""memjax.optim: memory-lean optimizers as optax ``GradientTransformation`` s.

Recipes (complete optimizers, like ``optax.adamw``):
  :func:`galore`, :func:`fira`, :func:`apollo`, :func:`apollo_mini`, :func:`frugal`,
  :func:`q_galore`, :func:`mezo` (zeroth order), :func:`mezo_shared_seed` (zeroth order over a
  data axis, one byte per worker per step)

Building blocks:
  :func:`scale_by_low_rank` (the projected transform), :mod:`projectors`, :mod:`residual`,
  :mod:`limiter` (Fira's norm-growth limiter), :mod:`quantization` (:func:`scale_by_adam_8bit`,
  INT4 projectors), :mod:`quantized_weights` (INT8 weights with stochastic rounding:
  :class:`QuantizedWeight`, :func:`quantize_weights`, :func:`apply_updates`), :mod:`zeroth_order` (:func:`spsa_estimate`, :func:`spsa_update`),
  :mod:`shared_seed` (:class:`OneByteCodec`, :class:`ReplayLog`, :func:`replay`),
  :func:`scale_by_hf_adam`, :func:`skip_nonfinite`, :func:`clip_by_global_norm`,
  :func:`add_decayed_weights_after_step`,
  :func:`label_matrices` / :class:`MatrixDims` (which leaves are matrices).

Accounting:
  :func:`describe` (every leaf's treatment and state bytes), :func:`state_bytes`,
  :func:`compiled_memory`.
"""

from memjax.optim import (
    limiter,
    projectors,
    quantization,
    quantized_weights,
    residual,
    shared_seed,
    zeroth_order,
)
from memjax.optim.accounting import CompiledMemory, compiled_memory, state_bytes
from memjax.optim.adam import ScaleByHFAdamState, scale_by_hf_adam
from memjax.optim.clipping import clip_by_global_norm
from memjax.optim.describe import Description, LeafDescription, describe
from memjax.optim.aliases import apollo, apollo_mini, fira, frugal, galore, q_galore
from memjax.optim.guards import SkipNonFiniteState, all_finite, skip_nonfinite
from memjax.optim.labels import (
    DEFAULT_EXCLUDE,
    MatrixDims,
    NoProjectionWarning,
    RuleDims,
    label_matrices,
    resolve_labels,
)
from memjax.optim.limiter import (
    NormGrowthState,
    limit_norm_growth,
    norm_growth_factor,
    scale_by_norm_growth_limit,
)
from memjax.optim.low_rank import LowRankState, scale_by_low_rank
from memjax.optim.projectors import (
    Projector,
    canonicalize_signs,
    dct_basis,
    make_projector,
)
from memjax.optim.quantization import (
    QuantizedProjectorState,
    ScaleByAdam8bitState,
    dequantize_blockwise,
    quantize_blockwise,
    quantized_svd_projector,
    scale_by_adam_8bit,
    svd_counts,
)
from memjax.optim.quantized_weights import (
    QuantizedWeight,
    WeightFormat,
    apply_updates,
    dequantize_weights,
    on_float_view,
    quantize_weights,
)
from memjax.optim.residual import BackProjection, ResidualPolicy
from memjax.optim.sharding import state_shardings
from memjax.optim.shared_seed import OneByteCodec, ReplayLog, mezo_shared_seed, replay
from memjax.optim.weight_decay import add_decayed_weights_after_step
from memjax.optim.zeroth_order import (
    Noise,
    ZerothOrderState,
    ZerothOrderTransformation,
    mezo,
    spsa_estimate,
    spsa_update,
)

__all__ = [
    "BackProjection",
    "DEFAULT_EXCLUDE",
    "Description",
    "LeafDescription",
    "NoProjectionWarning",
    "RuleDims",
    "describe",
    "CompiledMemory",
    "LowRankState",
    "MatrixDims",
    "Noise",
    "NormGrowthState",
    "OneByteCodec",
    "Projector",
    "QuantizedProjectorState",
    "QuantizedWeight",
    "ReplayLog",
    "ResidualPolicy",
    "ScaleByAdam8bitState",
    "ScaleByHFAdamState",
    "SkipNonFiniteState",
    "WeightFormat",
    "ZerothOrderState",
    "ZerothOrderTransformation",
    "add_decayed_weights_after_step",
    "all_finite",
    "apollo",
    "apollo_mini",
    "apply_updates",
    "canonicalize_signs",
    "clip_by_global_norm",
    "compiled_memory",
    "dct_basis",
    "dequantize_blockwise",
    "dequantize_weights",
    "fira",
    "frugal",
    "galore",
    "label_matrices",
    "limit_norm_growth",
    "norm_growth_factor",
    "on_float_view",
    "limiter",
    "make_projector",
    "mezo",
    "mezo_shared_seed",
    "projectors",
    "q_galore",
    "quantization",
    "quantize_blockwise",
    "quantized_svd_projector",
    "quantize_weights",
    "quantized_weights",
    "replay",
    "residual",
    "resolve_labels",
    "scale_by_adam_8bit",
    "scale_by_hf_adam",
    "scale_by_low_rank",
    "scale_by_norm_growth_limit",
    "shared_seed",
    "skip_nonfinite",
    "spsa_estimate",
    "spsa_update",
    "state_bytes",
    "state_shardings",
    "svd_counts",
    "zeroth_order",
]
