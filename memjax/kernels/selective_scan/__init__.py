"""Selective scan (the S6 layer of Mamba; Gu & Dao 2023, arXiv 2312.00752).

`selective_scan` (dispatching, validated), `selective_scan_reference` (sequential definition) and
`selective_state_update` (the one-token decode step). Shapes: u, delta, z: (batch, length, channels);
A: (channels, N); B, C: (batch, length, N); D, delta_bias: (channels,); state: (batch, channels, N).
"""

from memjax.kernels.selective_scan.ops import selective_scan
from memjax.kernels.selective_scan.reference import selective_scan_reference, selective_state_update

__all__ = ["selective_scan", "selective_scan_reference", "selective_state_update"]
