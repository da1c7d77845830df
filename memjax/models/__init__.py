"""Flax NNX sequence layers and a decoder language model."""

from memjax.models.linear_attention import HedgehogFeatureMap, LinearAttention, LinearAttentionCache
from memjax.models.mamba import BidirectionalMamba, Mamba, MambaCache, ResidualVisionMamba

__all__ = [
    "BidirectionalMamba",
    "HedgehogFeatureMap",
    "LinearAttention",
    "LinearAttentionCache",
    "Mamba",
    "MambaCache",
    "ResidualVisionMamba",
]
