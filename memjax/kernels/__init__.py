"""Functional cores of the sequence layers: readable references, XLA and Pallas implementations.

Each core is a subpackage (``reference.py`` beside the fast implementation, and ``ops.py`` that
dispatches on ``impl=``). A subpackage can be called as its main function:
``memjax.kernels.selective_scan(u, delta, A, B, C)`` is
``memjax.kernels.selective_scan.selective_scan(...)``.
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
