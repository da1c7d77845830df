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


# ---------------------------------------------------------------------------------------------
# Fira, APOLLO, FRUGAL (shared/REFERENCES.md), written from the authors' step, not from memjax.
# ---------------------------------------------------------------------------------------------


class NormLimiter:
    """Fira's norm-growth limiter: ``limiter = max(|S| / (prev + 1e-8), gamma) / gamma``."""

    def __init__(self, gamma=1.01):
        self.gamma, self.prev = gamma, None

    def __call__(self, s):
        norm = np.linalg.norm(s)
        if self.prev is None:
            self.prev = norm
            return s
        lim = max(norm / (self.prev + 1e-8), self.gamma) / self.gamma
        self.prev = norm / lim
        return s / lim


def authors_channel_factor(norm_grad, low_grad):
    """``norm(O, dim) / (norm(R, dim) + 1e-8)``, dim 0 if R has fewer rows than columns, else 1."""
    dim = 0 if low_grad.shape[0] < low_grad.shape[1] else 1
    phi = np.linalg.norm(norm_grad, axis=dim) / (np.linalg.norm(low_grad, axis=dim) + 1e-8)
    return phi[:, None] if dim == 1 else phi[None, :]


class _ProjectedHFAdam:
    """Shared skeleton of the GaLore-family torch optimizers (HF AdamW step, std side rule).

    ``projector(g, t) -> P`` returns a new projector at refresh steps: ``(r, n)`` for the right
    side, ``(m, r)`` for the left; by default the canonical-sign SVD of the gradient.
    """

    def __init__(self, shape, rank, update_proj_gap, lr, b1=0.9, b2=0.999, eps=1e-6,
                 weight_decay=0.0, projector=None):
        self.m, self.n = shape
        self.rank, self.gap = rank, update_proj_gap
        self.side = "right" if self.m >= self.n else "left"
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
        self.projector = projector or self._svd
        self.t, self.P = 0, None
        low = (self.m, rank) if self.side == "right" else (rank, self.n)
        self.exp_avg, self.exp_avg_sq = np.zeros(low), np.zeros(low)

    def _svd(self, g, t):
        u, _, vh = np.linalg.svd(g.astype(np.float32), full_matrices=False)
        if self.side == "right":
            return canonical(vh[: self.rank, :].astype(np.float64), axis=1)
        return canonical(u[:, : self.rank].astype(np.float64), axis=0)

    def down(self, g):
        return g @ self.P.T if self.side == "right" else self.P.T @ g

    def up(self, low):
        return low @ self.P if self.side == "right" else self.P @ low

    def adam(self, g):
        """Projects, updates the moments; returns ``(R, M / (sqrt(V) + eps), step_size)``."""
        if self.t % self.gap == 0:
            self.P = np.asarray(self.projector(g, self.t), np.float64)
        r = self.down(g)
        self.t += 1
        self.exp_avg = self.b1 * self.exp_avg + (1 - self.b1) * r
        self.exp_avg_sq = self.b2 * self.exp_avg_sq + (1 - self.b2) * r * r
        step_size = self.lr * np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        return r, self.exp_avg / (np.sqrt(self.exp_avg_sq) + self.eps), step_size

    def finish(self, w, update, step_size):
        w = w - step_size * update
        if self.wd > 0:
            w = w - self.lr * self.wd * w
        return w


class FiraAdamW(_ProjectedHFAdam):
    """Fira's AdamW step (fira ``FiraAdamW``) for one matrix."""

    def __init__(self, shape, rank, update_proj_gap, scale, lr, gamma=1.01, paper_form=False,
                 **kw):
        super().__init__(shape, rank, update_proj_gap, lr, **kw)
        self.scale, self.paper_form = scale, paper_form
        self.limiter = NormLimiter(gamma)

    def step(self, w, g):
        g = g.astype(np.float64)
        r, norm_grad, step_size = self.adam(g)
        phi = authors_channel_factor(norm_grad, r)
        sub = self.up(r) if self.paper_form else self.scale * self.up(r)
        s = self.limiter((g - sub) * phi)
        return self.finish(w, self.scale * self.up(norm_grad) + s, step_size)


class ApolloAdamW(_ProjectedHFAdam):
    """APOLLO's AdamW step (apollo-torch ``AdamW``) for one matrix."""

    def __init__(self, shape, rank, update_proj_gap, scale, lr, scale_type="channel",
                 scale_front=False, limiter=True, gamma=1.01, **kw):
        super().__init__(shape, rank, update_proj_gap, lr, **kw)
        self.scale, self.scale_type, self.scale_front = scale, scale_type, scale_front
        self.limiter = NormLimiter(gamma) if limiter else None

    def step(self, w, g):
        g = g.astype(np.float64)
        r, norm_grad, step_size = self.adam(g)
        if self.scale_type == "channel":
            factor = authors_channel_factor(norm_grad, r)
        else:
            factor = np.linalg.norm(norm_grad) / (np.linalg.norm(r) + 1e-8)
        scaled = g * factor
        if self.scale_front:
            scaled = scaled * np.sqrt(self.scale)
        if self.limiter is not None:
            scaled = self.limiter(scaled)
        if not self.scale_front:
            scaled = scaled * np.sqrt(self.scale)
        return self.finish(w, scaled, step_size)


class TorchAdamW:
    """FRUGAL's ``AdamW``: torch form (``lr / bc1 * M / (sqrt(V) / sqrt(bc2) + eps)``), the
    decay applied to the old weights first."""

    def __init__(self, shape, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
        self.reset(shape)

    def reset(self, shape):
        shape = () if shape is None else shape
        self.t, self.m, self.v = 0, np.zeros(shape), np.zeros(shape)

    def direction(self, g):
        """Adam's ``- update / lr`` for ``g`` (advances the moments)."""
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        bc1, bc2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        return self.m / bc1 / (np.sqrt(self.v) / np.sqrt(bc2) + self.eps)

    def step(self, w, g):
        w = w * (1 - self.lr * self.wd)
        return w - self.lr * self.direction(g.astype(np.float64))


class FrugalAdamW:
    """FRUGAL's projected AdamW (``GaloreAdamW`` / ``CoordAdamW``) for one matrix.

    ``projector(g, t) -> P`` gives the subspace as a matrix on the side ``side`` (the SVD, a
    random orthonormal basis or a coordinate selection: ``down(G) = G P^T`` / ``P^T G``).
    """

    def __init__(self, shape, side, projector, update_gap, lr, inactive_update_rule="sign_sgd",
                 inactive_lr_scale=1.0, reset_statistics=True, **adam_kw):
        self.side, self.projector, self.gap = side, projector, update_gap
        self.lr, self.rule, self.ratio, self.reset = lr, inactive_update_rule, inactive_lr_scale, \
            reset_statistics
        self.adam = TorchAdamW(None, lr, **adam_kw)
        self.wd = self.adam.wd
        self.step_count, self.P = 0, None

    def down(self, g):
        return g @ self.P.T if self.side == "right" else self.P.T @ g

    def up(self, low):
        return low @ self.P if self.side == "right" else self.P @ low

    def step(self, w, g):
        g = g.astype(np.float64)
        if self.step_count % self.gap == 0:
            self.P = np.asarray(self.projector(g, self.step_count), np.float64)
            if self.reset or self.step_count == 0:
                self.adam.reset(self.down(g).shape)
        self.step_count += 1
        w = w * (1 - self.lr * self.wd)
        r = self.down(g)
        update = -self.lr * self.up(self.adam.direction(r))
        inactive = g - self.up(r)
        if self.rule == "sgd":
            update = update - self.lr * self.ratio * inactive
        elif self.rule == "sign_sgd":
            update = update - self.lr * self.ratio * np.sign(inactive)
        return w + update


class BlockFrugalAdamW:
    """FRUGAL's ``BlockAdamW`` (BAdam-like) over matrices, with the authors' block-order loop."""

    def __init__(self, shapes, density, block_order, update_gap, lr, inactive_update_rule,
                 inactive_lr_scale=1.0, active_sets=None, **adam_kw):
        self.num = len(shapes)
        self.num_active = max(1, round(self.num * density))
        self.order, self.gap, self.lr = block_order, update_gap, lr
        self.rule, self.ratio = inactive_update_rule, inactive_lr_scale
        self.adams = [TorchAdamW(s, lr, **adam_kw) for s in shapes]
        self.active_sets = active_sets  # for "random": the sets chosen by the caller's RNG
        self.step_count, self.switches, self.next_start, self.active = 0, 0, None, set()

    def _switch(self):
        k, a = self.num, self.num_active
        if self.order == "random":
            self.active = set(self.active_sets(self.switches))
        elif self.order == "ascending":
            start = 0 if self.next_start is None else self.next_start
            self.active = {i % k for i in range(start, start + a)}
            start += a
            self.next_start = start - k if start >= k else start
        elif self.order == "descending":
            start = k - 1 if self.next_start is None else self.next_start
            self.active = {i % k for i in range(start, start - a, -1)}
            start -= a
            self.next_start = start + k if start < 0 else start
        elif self.order == "mirror":
            start = 0 if self.next_start is None else self.next_start
            self.active = set()
            for i in range(start, start + a // 2):
                self.active |= {i % (k // 2), k - 1 - i % (k // 2)}
            start += a // 2
            self.next_start = start - k // 2 if start >= k // 2 else start
        for i in self.active:
            self.adams[i].reset(self.adams[i].m.shape)
        self.switches += 1

    def step(self, ws, gs):
        if self.step_count % self.gap == 0:
            self._switch()
        self.step_count += 1
        out = []
        for i, (w, g) in enumerate(zip(ws, gs)):
            g = g.astype(np.float64)
            if i in self.active:
                w = w - self.lr * self.adams[i].direction(g)
            elif self.rule == "sign_sgd":
                w = w - self.lr * self.ratio * np.sign(g)
            elif self.rule == "sgd":
                w = w - self.lr * self.ratio * g
            out.append(w)
        return out


# ---------------------------------------------------------------------------------------------
# Quantizers (a NumPy model of the documented maps; float32 like the quantized kernels).
# ---------------------------------------------------------------------------------------------


def dynamic_codebook(signed):
    """Decade j from the top holds 2^(D-1-j) values 10^-j * linspace(0.1, 1, .)[1:], plus 0."""
    decades = 7 if signed else 8
    pos = []
    for top in range(decades - 1, -1, -1):  # top = 0 is the decade [0.1, 1]
        items = 2 ** (decades - 1 - top)
        pos.extend(10.0**-top * np.linspace(0.1, 1.0, items + 1)[1:])
    pos = np.sort(np.array(pos))
    vals = np.concatenate([-pos[::-1], [0.0], pos]) if signed else np.concatenate([[0.0], pos])
    return vals.astype(np.float32)


def quantize_8bit(x, block, kind, signed):
    """Returns ``(int8 codes like x, float32 absmax per block)``."""
    flat = np.asarray(x, np.float32).reshape(-1)
    nb = max(1, -(-flat.size // block))
    blocks = np.zeros(nb * block, np.float32)
    blocks[: flat.size] = flat
    blocks = blocks.reshape(nb, block)
    absmax = np.abs(blocks).max(axis=1)
    xn = blocks / np.where(absmax > 0, absmax, np.float32(1))[:, None]
    if kind == "linear":
        codes = np.round(xn * 127) if signed else np.round(xn * 255) - 128
    else:
        book = dynamic_codebook(signed)
        codes = np.searchsorted((book[1:] + book[:-1]) / 2, xn, side="left") - (127 if signed
                                                                               else 128)
    return codes.reshape(-1)[: flat.size].reshape(np.shape(x)).astype(np.int8), absmax


def dequantize_8bit(codes, absmax, block, kind, signed):
    c = np.asarray(codes, np.int64).reshape(-1)
    nb = absmax.size
    padded = np.zeros(nb * block, np.int64)
    padded[: c.size] = c
    padded = padded.reshape(nb, block)
    if kind == "linear":  # float32 arithmetic, like the kernel
        xn = (padded.astype(np.float32) / np.float32(127) if signed
              else (padded + 128).astype(np.float32) / np.float32(255))
    else:
        xn = dynamic_codebook(signed)[padded + (127 if signed else 128)]
    out = (xn.astype(np.float32) * absmax[:, None]).reshape(-1)[: c.size]
    return out.reshape(np.shape(codes)).astype(np.float32)


def quantize_8bit_slices(x, block, kind, signed):
    """:func:`quantize_8bit` of each ``x[i]`` on its own when ``x.ndim >= 3`` (absmax
    ``(x.shape[0], blocks per slice)``) when ``x.ndim >= 3``; of ``x`` whole otherwise."""
    x = np.asarray(x, np.float32)
    if x.ndim < 3:
        return quantize_8bit(x, block, kind, signed)
    parts = [quantize_8bit(row, block, kind, signed) for row in x]
    return np.stack([c for c, _ in parts]), np.stack([a for _, a in parts])


def dequantize_8bit_slices(codes, absmax, block, kind, signed):
    if np.ndim(codes) < 3:
        return dequantize_8bit(codes, absmax, block, kind, signed)
    return np.stack([dequantize_8bit(c, a, block, kind, signed) for c, a in zip(codes, absmax)])


def adam_8bit_step(g, mu_codes, mu_absmax, nu_codes, nu_absmax, t, block, kind, b1=0.9,
                   b2=0.999, eps=1e-6):
    """One 8-bit Adam step from a given quantized state (``t`` counts from 1): returns the HF
    update computed from the float32 moments and the requantized state (blocks per leading slice
    for ``ndim >= 3``)."""
    g = np.asarray(g, np.float32)
    m = b1 * dequantize_8bit_slices(mu_codes, mu_absmax, block, kind, True) + (1 - b1) * g
    v = b2 * dequantize_8bit_slices(nu_codes, nu_absmax, block, kind, False) + (1 - b2) * g * g
    u = np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    return (u, quantize_8bit_slices(m, block, kind, True),
            quantize_8bit_slices(v, block, kind, False))


def quantize_minmax(x, bits, group):
    """Asymmetric min-max codes (unpacked, uint8), step and minimum per group."""
    flat = np.asarray(x, np.float32).reshape(-1)
    ng = max(1, -(-flat.size // group))
    g = np.zeros(ng * group, np.float32)
    g[: flat.size] = flat
    g = g.reshape(ng, group)
    lo, hi = g.min(axis=1), g.max(axis=1)
    step = (hi - lo) / np.float32(2**bits - 1)
    codes = np.clip(np.round((g - lo[:, None]) / np.where(step > 0, step, 1)[:, None]), 0,
                    2**bits - 1)
    return codes.reshape(-1)[: flat.size].astype(np.uint8), step, lo


def dequantize_minmax(codes, step, lo, shape, group):
    c = np.zeros(step.size * group, np.float32)
    c[: codes.size] = codes
    vals = (c.reshape(step.size, group) * step[:, None] + lo[:, None]).reshape(-1)
    return vals[: int(np.prod(shape))].reshape(shape)


def unpack_int4(packed, size):
    """Low nibble first: entry 2k in bits 0-3 of byte k, entry 2k+1 in bits 4-7."""
    packed = np.asarray(packed, np.uint8)
    return np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:size]


def quantize_int8_weight(w, group, noise=None):
    """The authors' ``_quantize`` / ``_quantize_stochastic_round`` on groups of the flattening
    (with 0 in every group's range, as memjax keeps it)."""
    groups = np.asarray(w, np.float32).reshape(-1, group)
    hi, lo = np.maximum(groups.max(axis=1), 0), np.minimum(groups.min(axis=1), 0)
    scale = np.maximum(hi - lo, np.float32(1e-5)) * np.float32(1 / 255)
    inv = np.float32(1) / scale
    zero = np.clip(-np.round(lo * inv), 0, 255)
    y = groups * inv[:, None]
    if noise is None:
        y = np.round(y)
    else:
        down = np.floor(y)
        y = down + (noise.reshape(y.shape) < y - down)
    codes = np.clip(y + zero[:, None], 0, 255).astype(np.uint8)
    return codes.reshape(np.shape(w)), scale.astype(np.float32), zero.astype(np.uint8)


def dequantize_int8_weight(codes, scale, zero, group):
    """``(codes - zero) * scale`` per group of ``quantize_int8_weight``."""
    groups = codes.reshape(-1, group).astype(np.float32) - zero.astype(np.float32)[:, None]
    return (groups * scale[:, None]).reshape(codes.shape)
