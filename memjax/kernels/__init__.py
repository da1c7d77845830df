"""Functional cores of the sequence layers: readable references, XLA and Pallas implementations."""

__all__: list[str] = []
