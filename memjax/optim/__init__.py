"""memjax.optim: memory-lean optimizers as optax ``GradientTransformation`` s.

Recipes (complete optimizers, like ``optax.adamw``):
  :func:`galore`, :func:`fira`, :func:`apollo`, :func:`apollo_mini`, :func:`frugal`,
  :func:`q_galore`, :func:`mezo` (zeroth order), :func:`mezo_shared_seed` (zeroth order over a
  data axis, one byte per worker per step)

Building blocks:
  :func:`scale_by_low_rank` (the projected transform), :mod:`projectors` (svd, dct, random,
  :func:`power_projector`), :mod:`residual`, :func:`scale_by_block_adam` (FRUGAL / BAdam
  blocks), :func:`recipe.finish` (how every recipe ends),
  :mod:`limiter` (Fira's norm-growth limiter), :mod:`quantization` (:func:`scale_by_adam_8bit`,
  INT4 projectors), :mod:`quantized_weights` (INT8 weights with stochastic rounding:
  :class:`QuantizedWeight`, :func:`quantize_weights`, :func:`apply_updates`),
  :mod:`zeroth_order` (:func:`spsa_estimate`, :func:`spsa_update`),
  :mod:`shared_seed` (:class:`OneByteCodec`, :class:`ReplayLog`, :func:`replay`),
  :func:`scale_by_hf_adam`, :func:`scale_by_hf_bias_correction`, :func:`skip_nonfinite`,
  :func:`clip_by_global_norm`,
  :func:`add_decayed_weights_after_step`,
  :func:`label_matrices` / :class:`MatrixDims` (which leaves are matrices).

Accounting:
  :func:`describe` (every leaf's treatment and state bytes), :func:`state_bytes`,
  :func:`compiled_memory`.
"""

from memjax.optim._apollo import apollo, apollo_mini
from memjax.optim._fira import fira
from memjax.optim._frugal import frugal
from memjax.optim._galore import galore
from memjax.optim._q_galore import q_galore
from memjax.optim import (
    block_adam,
    limiter,
    projectors,
    quantization,
    quantized_weights,
    recipe,
    residual,
    shared_seed,
    zeroth_order,
)
from memjax.optim.accounting import CompiledMemory, compiled_memory, state_bytes
from memjax.optim.adam import (
    ScaleByHFAdamState,
    scale_by_hf_adam,
    scale_by_hf_bias_correction,
)
from memjax.optim.block_adam import BlockState, scale_by_block_adam
from memjax.optim.clipping import clip_by_global_norm
from memjax.optim.describe import Description, LeafDescription, describe
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
    power_projector,
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
    "add_decayed_weights_after_step",
    "all_finite",
    "apollo",
    "apollo_mini",
    "apply_updates",
    "BackProjection",
    "block_adam",
    "BlockState",
    "canonicalize_signs",
    "clip_by_global_norm",
    "compiled_memory",
    "CompiledMemory",
    "dct_basis",
    "DEFAULT_EXCLUDE",
    "dequantize_blockwise",
    "dequantize_weights",
    "describe",
    "Description",
    "fira",
    "frugal",
    "galore",
    "label_matrices",
    "LeafDescription",
    "limit_norm_growth",
    "limiter",
    "LowRankState",
    "make_projector",
    "MatrixDims",
    "mezo",
    "mezo_shared_seed",
    "Noise",
    "NoProjectionWarning",
    "norm_growth_factor",
    "NormGrowthState",
    "on_float_view",
    "OneByteCodec",
    "power_projector",
    "Projector",
    "projectors",
    "q_galore",
    "quantization",
    "quantize_blockwise",
    "quantize_weights",
    "quantized_svd_projector",
    "quantized_weights",
    "QuantizedProjectorState",
    "QuantizedWeight",
    "recipe",
    "replay",
    "ReplayLog",
    "residual",
    "ResidualPolicy",
    "resolve_labels",
    "RuleDims",
    "scale_by_adam_8bit",
    "scale_by_block_adam",
    "scale_by_hf_adam",
    "scale_by_hf_bias_correction",
    "scale_by_low_rank",
    "scale_by_norm_growth_limit",
    "ScaleByAdam8bitState",
    "ScaleByHFAdamState",
    "shared_seed",
    "skip_nonfinite",
    "SkipNonFiniteState",
    "spsa_estimate",
    "spsa_update",
    "state_bytes",
    "state_shardings",
    "svd_counts",
    "WeightFormat",
    "zeroth_order",
    "ZerothOrderState",
    "ZerothOrderTransformation",
]
