"""Independent NumPy re-implementations of the authors' optimizer steps, for tests only.

Written from the algorithms in shared/REFERENCES.md (the authors' torch code), not from memjax:
float64 arithmetic, SVD in float32 as the authors do, singular-vector signs canonicalised
(largest-magnitude entry positive) exactly as memjax documents.
"""

from __future__ import annotations

import numpy as np


def canonical(vectors: np.ndarray, axis: int) -> np.ndarray:
    idx = np.argmax(np.abs(vectors), axis=axis)
    if axis == 0:
        signs = np.sign(vectors[idx, np.arange(vectors.shape[1])])
        return vectors * np.where(signs < 0, -1.0, 1.0)[None, :]
    signs = np.sign(vectors[np.arange(vectors.shape[0]), idx])
    return vectors * np.where(signs < 0, -1.0, 1.0)[:, None]


def galore_side(proj_type: str, m: int, n: int) -> str:
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type == "min_state":
        # Adam keeps 2 moments of the low-rank shape; the SVD projector stores P.
        r = 1  # both costs are linear in r
        left, right = 2 * r * n + m * r, 2 * m * r + r * n
        return galore_side("std", m, n) if left == right else ("left" if left < right else "right")
    return proj_type


class GaLoreAdamW:
    """The GaLore AdamW step (galore-torch ``AdamW`` + ``GaLoreProjector``) for one matrix."""

    def __init__(self, shape, rank, update_proj_gap, scale, proj_type, lr, b1=0.9, b2=0.999,
                 eps=1e-6, weight_decay=0.0):
        self.m, self.n = shape
        self.rank, self.gap, self.scale = rank, update_proj_gap, scale
        self.side = galore_side(proj_type, self.m, self.n)
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
        self.step_count = 0
        self.P = None
        low = (self.m, rank) if self.side == "right" else (rank, self.n)
        self.exp_avg = np.zeros(low)
        self.exp_avg_sq = np.zeros(low)

    def _svd_projector(self, g):
        u, _, vh = np.linalg.svd(g.astype(np.float32), full_matrices=False)
        if self.side == "right":
            return canonical(vh[: self.rank, :].astype(np.float64), axis=1)
        return canonical(u[:, : self.rank].astype(np.float64), axis=0)

    def step(self, w: np.ndarray, g: np.ndarray) -> np.ndarray:
        g = g.astype(np.float64)
        if self.step_count % self.gap == 0:
            self.P = self._svd_projector(g)
        r = g @ self.P.T if self.side == "right" else self.P.T @ g
        self.step_count += 1
        t = self.step_count
        self.exp_avg = self.b1 * self.exp_avg + (1 - self.b1) * r
        self.exp_avg_sq = self.b2 * self.exp_avg_sq + (1 - self.b2) * r * r
        denom = np.sqrt(self.exp_avg_sq) + self.eps
        step_size = self.lr * np.sqrt(1 - self.b2**t) / (1 - self.b1**t)
        norm_grad = self.exp_avg / denom
        back = norm_grad @ self.P if self.side == "right" else self.P @ norm_grad
        w = w - step_size * back * self.scale
        if self.wd > 0:
            w = w - self.lr * self.wd * w
        return w


class AdamW:
    """The same AdamW on a full (non-projected) leaf."""

    def __init__(self, shape, lr, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0):
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
        self.t = 0
        self.m = np.zeros(shape)
        self.v = np.zeros(shape)

    def step(self, w, g):
        g = g.astype(np.float64)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        step_size = self.lr * np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        w = w - step_size * self.m / (np.sqrt(self.v) + self.eps)
        if self.wd > 0:
            w = w - self.lr * self.wd * w
        return w
