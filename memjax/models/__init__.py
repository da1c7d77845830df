"""Flax NNX sequence layers and a decoder language model."""

__all__: list[str] = []
