"""Scatterbrain attention (Chen et al. 2021, arXiv 2110.15343): low rank + sparse, unified.

* :func:`scatterbrain_attention` -- the sub-quadratic implementation (``ops.py``).
* :func:`scatterbrain_attention_reference` -- the dense definition (``reference.py``).
* :func:`gaussian_projection`, :func:`lsh_rotations` -- the random draws (Performer features, LSH).
"""

from memjax.kernels.scatterbrain.ops import gaussian_projection, lsh_rotations, scatterbrain_attention
from memjax.kernels.scatterbrain.reference import (
    log_features,
    lsh_hash,
    scatterbrain_attention_reference,
    scatterbrain_unnormalized,
    support_mask,
)

__all__ = [
    "gaussian_projection",
    "log_features",
    "lsh_hash",
    "lsh_rotations",
    "scatterbrain_attention",
    "scatterbrain_attention_reference",
    "scatterbrain_unnormalized",
    "support_mask",
]
