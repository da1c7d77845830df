"""Functional cores of the sequence layers: readable references, XLA and Pallas implementations.

Each core is a subpackage (``reference.py`` beside the fast implementation, and ``ops.py`` that
dispatches on ``impl=``). A subpackage can be called as its main function:
``memjax.kernels.selective_scan(u, delta, A, B, C)`` is
``memjax.kernels.selective_scan.selective_scan(...)``.
"""

from memjax.kernels import linear_attention, selective_scan

__all__ = ["linear_attention", "selective_scan"]
