"""Functional cores of the sequence layers: readable references, XLA and Pallas implementations.

Each core is a subpackage (``reference.py`` beside the fast implementation, and ``ops.py`` that
dispatches on ``impl=``, per lowering platform for ``"auto"`` and ``"pallas"``). Entry points are
plain functions: ``memjax.kernels.selective_scan.selective_scan(u, delta, A, B, C)``,
``memjax.kernels.linear_attention.linear_attention(q, k, v)``,
``memjax.kernels.combiner_attention`` and ``memjax.kernels.scatterbrain_attention``.
"""

from memjax.kernels import combiner, linear_attention, scatterbrain, selective_scan
from memjax.kernels.combiner import combiner_attention
from memjax.kernels.scatterbrain import gaussian_projection, lsh_rotations, scatterbrain_attention

__all__ = [
    "combiner",
    "combiner_attention",
    "gaussian_projection",
    "linear_attention",
    "lsh_rotations",
    "scatterbrain",
    "scatterbrain_attention",
    "selective_scan",
]
