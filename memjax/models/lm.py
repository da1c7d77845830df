"""A LLaMA-style decoder language model with a pluggable sequence mixer.

Architecture (pre-norm, as in LLaMA; Touvron et al. 2023, arXiv 2302.13971)::

    x = embed(tokens)                                   # (B, L) int32 -> (B, L, d_model)
    repeat num_layers times (one stacked block, lax.scan over the "layers" axis):
        x = x + mixer(rms_norm(x))                      # causal: attention | mamba | linear | ...
        x = x + swiglu(rms_norm(x))                     # down(silu(gate x) * up x)
    logits = lm_head(rms_norm(x))                       # (B, L, vocab) float32; untied by default

Mixers: ``"attention"`` (softmax + RoPE, :mod:`memjax.models.attention`), ``"mamba"``
(:class:`memjax.models.mamba.Mamba`), ``"linear"`` (:class:`memjax.models.linear_attention.LinearAttention`),
``"combiner"`` (:class:`memjax.models.combiner.CombinerAttention`), ``"scatterbrain"``
(:class:`memjax.models.scatterbrain.ScatterbrainAttention`); ``LMConfig.mixer_kwargs`` go to the
mixer's constructor.

Layers are created once as a stack (``jax.vmap`` over a layer-creation function, every parameter
gets a leading ``"layers"`` axis) and run with ``jax.lax.scan``, so compile time does not grow with
depth. The scan body is wrapped in ``jax.checkpoint`` according to ``LMConfig.remat``:

* ``"none"``: no rematerialisation; every intermediate of every layer is kept for the backward pass.
* ``"full"``: keep only each layer's input; recompute the whole layer in the backward pass.
* ``"selective"``: keep the outputs of the weight matmuls (dots without batch dimensions) and
  recompute the rest: attention scores / softmax (batched dots), norms, activations
  (Korthikanti et al. 2022, arXiv 2205.05198, "Reducing Activation Recomputation in Large
  Transformer Models").

Cached decoding (``init_cache`` / ``decode_step`` / :func:`generate`) exists for mixers with a
recurrent form: attention (a KV cache), mamba and linear (their ``init_cache`` / ``step``).

INT8 weights (``LMConfig.weight_bits=8``; Q-GaLore, Zhang et al. 2024, arXiv 2407.08296): the
linear kernels of the blocks (attention q/k/v/o and MLP gate/up/down, the authors' target modules;
the attention mixer only) are held as
:class:`memjax.optim.QuantizedWeight` s (uint8 codes, a scale and zero point per group of
``weight_group_size`` entries, quantised from the usual initial weights) and dequantised one layer
at a time inside the scan body. The embedding, the head and the norms stay float, as the authors
keep them. Updates re-quantise with ``weight_rounding`` (:mod:`memjax.optim.quantized_weights`).

Parameters carry logical axis names -- ``"vocab"``, ``"embed"``, ``"mlp"``, ``"heads"`` and
``"layers"`` on the stacked axis -- as metadata; see :func:`memjax.models.layers.partitioned`.

Presets follow the GaLore paper's LLaMA shapes (Zhao et al. 2024, arXiv 2403.03507); their names are
nominal: the untied models have 58.1M / 134.1M / 368.0M / 1.339B / 6.738B parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from memjax.models.attention import CausalSelfAttention
from memjax.models.layers import DEFAULT_INIT_STD, RMSNorm, SwiGLU, partitioned
from memjax.optim import quantized_weights as qw

__all__ = [
    "LM",
    "LMConfig",
    "MIXERS",
    "PRESETS",
    "RECURRENT_MIXERS",
    "REMAT_POLICIES",
    "generate",
    "layered",
    "lm_preset",
    "next_token_loss",
    "num_params",
]

MIXERS = ("attention", "mamba", "linear", "combiner", "scatterbrain")
RECURRENT_MIXERS = ("attention", "mamba", "linear")
REMAT_POLICIES = ("none", "full", "selective")

# name -> (module, class, whether the constructor takes num_heads after d_model)
_MIXER_CLASSES = {
    "mamba": ("memjax.models.mamba", "Mamba", False),
    "linear": ("memjax.models.linear_attention", "LinearAttention", True),
    "combiner": ("memjax.models.combiner", "CombinerAttention", True),
    "scatterbrain": ("memjax.models.scatterbrain", "ScatterbrainAttention", True),
}


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Shape and behaviour of an :class:`LM`; validated on construction (``ValueError``).

    Attributes:
      vocab_size: number of tokens.
      d_model: model width.
      num_layers: number of blocks.
      num_heads: heads of the mixer (ignored by mamba); must divide ``d_model``.
      ffn_dim: hidden width of the SwiGLU MLP.
      max_length: longest sequence accepted by ``__call__`` and the default cache length.
      mixer: one of :data:`MIXERS`.
      mixer_kwargs: extra keyword arguments of the mixer's constructor (e.g. ``{"d_state": 16}``
        for mamba, ``{"rope_base": 1e4}`` for attention); stored as a hashable ``FrozenDict``.
      remat: one of :data:`REMAT_POLICIES`.
      tie_embeddings: share the embedding matrix with the output head.
      dtype: computation dtype (activations); logits are always float32.
      param_dtype: parameter dtype.
      norm_eps: RMSNorm epsilon.
      weight_bits: ``None`` (float weights) or 8: the blocks' linear kernels in INT8 (see the
        module docstring).
      weight_group_size: entries per scale of the INT8 kernels (must divide each kernel's size).
      weight_rounding: ``"stochastic"`` or ``"nearest"``: how updates re-quantise them.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_length: int = 256
    mixer: str = "attention"
    mixer_kwargs: Mapping[str, Any] = FrozenDict()
    remat: str = "none"
    tie_embeddings: bool = False
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    norm_eps: float = 1e-6
    weight_bits: int | None = None
    weight_group_size: int = 256
    weight_rounding: str = "stochastic"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {value!r}")
        if self.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {self.mixer!r}; expected one of {MIXERS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}"
            )
        if self.mixer == "attention" and (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"attention needs an even head size for RoPE, got d_model/num_heads="
                f"{self.d_model // self.num_heads}"
            )
        if not isinstance(self.mixer_kwargs, Mapping):
            raise ValueError(f"mixer_kwargs must be a mapping, got {type(self.mixer_kwargs)}")
        if "rngs" in self.mixer_kwargs:
            raise ValueError("mixer_kwargs must not contain 'rngs'")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        try:
            dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        except TypeError as err:
            raise ValueError(f"bad dtype in LMConfig: {err}") from None
        if self.weight_bits is not None:
            fmt = self.weight_format  # validates bits, group size and rounding (ValueError)
            if self.mixer != "attention":
                raise ValueError(
                    f"weight_bits=8 is implemented for the attention mixer (the authors' LLaMA "
                    f"q/k/v/o and MLP kernels), not mixer={self.mixer!r}")
            sizes = {"d_model * d_model": self.d_model**2, "d_model * ffn_dim":
                     self.d_model * self.ffn_dim}
            kv_heads = self.mixer_kwargs.get("num_kv_heads")
            if kv_heads:  # grouped-query attention: k / v are d_model x (K * head_dim)
                sizes["d_model * num_kv_heads * head_dim"] = (
                    self.d_model * kv_heads * self.head_dim)
            bad = [name for name, size in sizes.items() if size % fmt.group_size]
            if bad:
                raise ValueError(
                    f"weight_group_size={fmt.group_size} must divide the entries of every INT8 "
                    f"kernel; it does not divide {', '.join(bad)} "
                    f"({', '.join(str(sizes[b]) for b in bad)})")
        object.__setattr__(self, "mixer_kwargs", FrozenDict(self.mixer_kwargs))
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "param_dtype", param_dtype)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def weight_format(self) -> qw.WeightFormat | None:
        """The :class:`memjax.optim.WeightFormat` of the blocks' kernels (``None``: float)."""
        if self.weight_bits is None:
            return None
        return qw.WeightFormat(self.weight_bits, self.weight_group_size, self.weight_rounding)


PRESETS: Mapping[str, LMConfig] = FrozenDict(
    {
        # GaLore paper LLaMA shapes (configs/llama_*.json of the authors' code), sequence 256.
        "llama_60m": LMConfig(32000, 512, 8, 8, 1376),
        "llama_130m": LMConfig(32000, 768, 12, 12, 2048),
        "llama_350m": LMConfig(32000, 1024, 24, 16, 2736),
        "llama_1b": LMConfig(32000, 2048, 24, 32, 5461),
        # LLaMA-7B (Touvron et al. 2023): the GaLore paper's 7B memory figure (Fig. 1, Sec. 5.5).
        "llama_7b": LMConfig(32000, 4096, 32, 32, 11008),
        # Tiny models for tests and CPU examples.
        "tiny": LMConfig(64, 32, 2, 2, 64, max_length=128),
        "tiny_bytes": LMConfig(256, 64, 2, 4, 172, max_length=256),
    }
)


def lm_preset(name: str, **overrides: Any) -> LMConfig:
    """A named preset of :data:`PRESETS` with fields replaced, e.g. ``lm_preset("tiny", mixer="mamba")``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------- blocks


def _mixer_class(mixer: str) -> tuple[type, bool]:
    module_name, class_name, takes_heads = _MIXER_CLASSES[mixer]
    return getattr(importlib.import_module(module_name), class_name), takes_heads


def _accepts(cls: type, name: str) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def make_mixer(config: LMConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Build the sequence mixer named by ``config.mixer``: (B, L, d_model) -> (B, L, d_model)."""
    kwargs = dict(config.mixer_kwargs)
    if config.mixer == "attention":
        cls, args = CausalSelfAttention, (config.d_model, config.num_heads)
    else:
        cls, takes_heads = _mixer_class(config.mixer)
        args = (config.d_model, config.num_heads) if takes_heads else (config.d_model,)
    for name in ("dtype", "param_dtype"):
        if name not in kwargs and _accepts(cls, name):
            kwargs[name] = getattr(config, name)
    return cls(*args, **kwargs, rngs=rngs)


class Block(nnx.Module):
    """One pre-norm decoder block: ``x + mixer(norm(x))`` then ``x + swiglu(norm(x))``.

    ``__call__(x)``: (B, L, d_model) -> (B, L, d_model).
    """

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        norm = functools.partial(
            RMSNorm, config.d_model, eps=config.norm_eps, dtype=config.dtype,
            param_dtype=config.param_dtype,
        )
        self.mixer_norm = norm()
        self.mixer = make_mixer(config, rngs=rngs)
        self.mlp_norm = norm()
        self.mlp = SwiGLU(
            config.d_model, config.ffn_dim, dtype=config.dtype, param_dtype=config.param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.mixer(self.mixer_norm(x)).astype(x.dtype)
        return x + self.mlp(self.mlp_norm(x)).astype(x.dtype)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any) -> Any:
        return self.mixer.init_cache(batch_size, max_length, dtype)

    def step(self, x: jax.Array, cache: Any, position: jax.Array) -> tuple[jax.Array, Any]:
        """(B, d_model), mixer cache, scalar position -> (B, d_model), new mixer cache."""
        h = self.mixer_norm(x)
        if isinstance(self.mixer, CausalSelfAttention):
            y, cache = self.mixer.step(h, cache, position)
        else:
            y, cache = self.mixer.step(h, cache)
        x = x + y.astype(x.dtype)
        return x + self.mlp(self.mlp_norm(x)).astype(x.dtype), cache


def _add_layers_axis(variable: Any) -> Any:
    """Prefix the logical names of a stacked variable (not RNG state) with ``"layers"``."""
    if isinstance(variable, nnx.Variable) and not isinstance(variable, nnx.RngState):
        names = variable.get_metadata().get("out_sharding")
        if names:
            names = ("layers", *names)
        else:  # created without names (e.g. a mixer's non-trainable buffer)
            names = ("layers",) + (None,) * (jnp.ndim(variable[...]) - 1)
        variable.set_metadata(out_sharding=names, eager_sharding=False)
    return variable


def stack_layers(make_layer: Any, num_layers: int, key: jax.Array) -> nnx.Module:
    """Create ``num_layers`` independent layers as one module whose arrays have a leading layer axis.

    ``make_layer(rngs) -> nnx.Module`` is traced once under ``jax.vmap`` over ``num_layers`` keys.
    """
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_layer(nnx.Rngs(0))))
    keys = jax.random.split(key, num_layers)
    state = jax.vmap(lambda k: nnx.state(make_layer(nnx.Rngs(k))))(keys)
    state = jax.tree.map(_add_layers_axis, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.merge(graphdef, state)


def is_block_kernel(path: str, leaf: Any) -> bool:
    """Whether a leaf of the stacked blocks (``path`` relative to them) is a linear kernel that
    INT8 weights replace: a ``kernel`` that is a matrix in each layer (stacked: 3 dims)."""
    return path.split("/")[-1] == "kernel" and jnp.ndim(leaf) == 3


def quantize_blocks(blocks: nnx.Module, fmt: qw.WeightFormat, key: jax.Array) -> None:
    """Replace, in place, the stacked blocks' linear kernels (:func:`is_block_kernel`) by
    :class:`memjax.optim.QuantizedWeight` s of format ``fmt`` (one key chain per layer and
    kernel, from ``key``)."""
    state = nnx.state(blocks, nnx.Param)
    pure = qw.quantize_weights(nnx.to_pure_dict(state), fmt, where=is_block_kernel, seed=key,
                               lead_axes=1)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(blocks, state)


ParamHook = Callable[[str, Any, Any], Any]
"""``(name, param_state, layer_index_or_None) -> param_state``; see :meth:`LM.__call__`."""


def _hooked(module: Any, name: str, param_hook: ParamHook | None) -> Any:
    """``module`` with its ``nnx.Param`` state passed through ``param_hook`` (a new module)."""
    if param_hook is None:
        return module
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return nnx.merge(graphdef, param_hook(name, params, None), rest)


def _remat(body: Any, policy: str) -> Any:
    if policy == "none":
        return body
    if policy == "full":
        return jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    return jax.checkpoint(
        body, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, prevent_cse=False
    )


# ----------------------------------------------------------------------------- model


class LM(nnx.Module):
    """Decoder language model; see the module docstring.

    Args:
      config: an :class:`LMConfig`.
      rngs: ``nnx.Rngs``; its ``params`` stream (or default) seeds every parameter.

    ``__call__(tokens)``: (B, L) int -> logits (B, L, vocab_size) float32, L <= config.max_length.
    """

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, LMConfig):
            raise ValueError(f"config must be an LMConfig, got {type(config)}")
        self.config = config
        c = config
        self.embed = nnx.Embed(
            c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(DEFAULT_INIT_STD), ("vocab", "embed")),
            rngs=rngs,
        )
        self.blocks = stack_layers(lambda r: Block(c, rngs=r), c.num_layers, rngs.params())
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        if c.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                c.d_model, c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                kernel_init=partitioned(nnx.initializers.normal(DEFAULT_INIT_STD), ("embed", "vocab")),
                rngs=rngs,
            )
        if c.weight_format is not None:  # the usual initial weights, quantised; the rounding keys
            # are drawn last, so every float parameter equals the float model's
            quantize_blocks(self.blocks, c.weight_format, rngs.params())

    # -- training form

    def __call__(self, tokens: jax.Array, *, param_hook: ParamHook | None = None) -> jax.Array:
        """(B, L) int tokens -> (B, L, vocab_size) float32 logits.

        ``param_hook(name, params, layer) -> params``, if given, transforms the ``nnx.Param`` state
        of each part just before it is used: ``("embed", state, None)``, then for every layer
        ``("blocks", layer_state, l)`` inside the scan body (``layer_state`` is layer ``l``'s slice,
        without the stacked axis, ``l`` an int32 scalar), then ``("final_norm", state, None)`` and,
        unless the embeddings are tied (the head is then the hooked embedding),
        ``("lm_head", state, None)``. Zeroth-order training uses it to perturb each layer where it
        is used (:mod:`memjax.optim.zeroth_order`), so no perturbed copy of the stack is built.
        """
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be (batch, length) integers, got {tokens.shape} {tokens.dtype}")
        if tokens.shape[1] > self.config.max_length:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds max_length={self.config.max_length}"
            )
        embed = _hooked(self.embed, "embed", param_hook)
        graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)

        def body(x, layer):
            layer_params, layer_rest, index = layer
            layer_params = qw.dequantize_weights(layer_params)  # one layer at a time
            if param_hook is not None:
                layer_params = param_hook("blocks", layer_params, index)
            return nnx.merge(graphdef, layer_params, layer_rest)(x), None

        layers = (params, rest, jnp.arange(self.config.num_layers, dtype=jnp.int32))
        x, _ = jax.lax.scan(_remat(body, self.config.remat), embed(tokens), layers)
        return self._logits(x, embed, param_hook)

    def _logits(self, x: jax.Array, embed: nnx.Embed | None = None,
                param_hook: ParamHook | None = None) -> jax.Array:
        h = _hooked(self.final_norm, "final_norm", param_hook)(x)
        if self.lm_head is None:
            logits = (embed if embed is not None else self.embed).attend(h)
        else:
            logits = _hooked(self.lm_head, "lm_head", param_hook)(h)
        return logits.astype(jnp.float32)

    # -- decode form

    def _check_recurrent(self) -> None:
        if self.config.mixer not in RECURRENT_MIXERS:
            raise NotImplementedError(
                f"cached decoding needs a mixer with a recurrent form {RECURRENT_MIXERS}; "
                f"{self.config.mixer!r} has none (run the full forward on the whole prefix instead)"
            )

    def init_cache(self, batch_size: int, max_length: int | None = None, dtype: Any = None) -> Any:
        """Empty decoding cache for every layer (a pytree; each leaf has a leading layer axis).

        Args:
          batch_size: B.
          max_length: longest sequence to decode (KV-cache length); default ``config.max_length``.
          dtype: cache dtype; default ``config.dtype``.
        """
        self._check_recurrent()
        max_length = self.config.max_length if max_length is None else max_length
        dtype = self.config.dtype if dtype is None else dtype
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
        graphdef, state = nnx.split(self.blocks)
        return jax.vmap(lambda s: nnx.merge(graphdef, s).init_cache(batch_size, max_length, dtype))(state)

    def decode_step(
        self, token: jax.Array, cache: Any, position: jax.Array | int
    ) -> tuple[jax.Array, Any]:
        """One decoding step.

        Args:
          token: (B,) int, the token at ``position``.
          cache: from :meth:`init_cache` or the previous step (positions ``0 .. position - 1``).
          position: scalar int, index of ``token`` in the sequence (used by attention's RoPE and
            cache; mamba and linear track their own state).

        Returns:
          logits (B, vocab_size) float32 for the token at ``position + 1``, and the new cache.
        """
        self._check_recurrent()
        if token.ndim != 1:
            raise ValueError(f"token must have shape (batch,), got {token.shape}")
        position = jnp.asarray(position, jnp.int32)
        graphdef, state = nnx.split(self.blocks)

        def body(x, layer):
            layer_state, layer_cache = layer
            layer = nnx.merge(graphdef, qw.dequantize_weights(layer_state))
            return layer.step(x, layer_cache, position)

        x, cache = jax.lax.scan(body, self.embed(token), (state, cache))
        return self._logits(x), cache


# ----------------------------------------------------------------------------- helpers


def next_token_loss(model: LM, tokens: jax.Array, mask: jax.Array | None = None, *,
                    param_hook: ParamHook | None = None) -> jax.Array:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from the prefixes.

    Args:
      model: an :class:`LM`.
      tokens: (B, L) int.
      mask: optional (B, L - 1) weights of the targets ``tokens[:, 1:]`` (e.g. 0 on padding).
      param_hook: passed to :meth:`LM.__call__`.

    Returns:
      a float32 scalar.
    """
    logits = model(tokens, param_hook=param_hook)  # full length in, so mixers with length constraints see L
    return _next_token_nll(logits, tokens, mask)


def _next_token_nll(logits: jax.Array, tokens: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean (masked) cross-entropy of ``logits[:, :-1]`` against ``tokens[:, 1:]``."""
    logits = logits[:, :-1]
    targets = tokens[:, 1:]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - picked  # (B, L - 1)
    if mask is None:
        return jnp.mean(nll)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(graphdef: Any, state: Any, prompt: jax.Array, num_tokens: int) -> jax.Array:
    model = nnx.merge(graphdef, state)
    batch, prompt_length = prompt.shape
    cache = model.init_cache(batch, prompt_length + num_tokens)

    def prefill(cache, inputs):
        token, position = inputs
        logits, cache = model.decode_step(token, cache, position)
        return cache, logits

    cache, logits = jax.lax.scan(prefill, cache, (prompt.T, jnp.arange(prompt_length)))
    first = jnp.argmax(logits[-1], axis=-1).astype(prompt.dtype)

    def sample(carry, position):
        token, cache = carry
        logits, cache = model.decode_step(token, cache, position)
        token = jnp.argmax(logits, axis=-1).astype(prompt.dtype)
        return (token, cache), token

    positions = prompt_length + jnp.arange(num_tokens - 1)
    _, rest = jax.lax.scan(sample, (first, cache), positions)  # (num_tokens - 1, B)
    return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


def generate(model: LM, prompt: jax.Array, num_tokens: int) -> jax.Array:
    """Greedy decoding with the cache: (B, P) int prompt -> (B, P + num_tokens) tokens.

    The prompt is fed one token at a time through :meth:`LM.decode_step` (jit-compiled once per
    shape); mixers without a recurrent form raise ``NotImplementedError``.
    """
    model._check_recurrent()
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, length >= 1), got {prompt.shape}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if num_tokens == 0:
        return prompt
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, num_tokens)


def layered(config: LMConfig) -> Any:
    """The LM's :func:`next_token_loss` as a :class:`memjax.training.Layered` (embedding; one
    block, rematerialised per ``config.remat``; final norm, head and loss), for
    :func:`memjax.training.layerwise_step` on the pure-dict parameters
    (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``). Batches are ``(tokens, mask)`` pairs:
    (B, L) int tokens and a (B, L - 1) mask of the targets (or ``None``).
    """
    from memjax.training import Layered

    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    if jax.tree.leaves(nnx.state(abstract, nnx.Not(nnx.Param))):
        raise NotImplementedError("layered() supports models whose only state is nnx.Param")
    embed_def = nnx.graphdef(abstract.embed)
    norm_def = nnx.graphdef(abstract.final_norm)
    head_def = None if abstract.lm_head is None else nnx.graphdef(abstract.lm_head)
    block_def = nnx.graphdef(nnx.eval_shape(lambda: Block(config, rngs=nnx.Rngs(0))))

    def before(rest, batch):
        tokens = batch[0]
        if tokens.shape[1] > config.max_length:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_length="
                             f"{config.max_length}")
        return nnx.merge(embed_def, rest["embed"])(tokens)

    def layer(w, x):
        return nnx.merge(block_def, w)(x)

    def after(rest, x, batch):
        tokens, mask = batch
        h = nnx.merge(norm_def, rest["final_norm"])(x)
        if head_def is None:
            logits = nnx.merge(embed_def, rest["embed"]).attend(h)
        else:
            logits = nnx.merge(head_def, rest["lm_head"])(h)
        return _next_token_nll(logits.astype(jnp.float32), tokens, mask)

    return Layered(before, _remat(layer, config.remat), after, stack="blocks")


def num_params(config: LMConfig) -> int:
    """Number of parameters of ``LM(config)``, from shapes only (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    return sum(p.size for p in jax.tree.leaves(nnx.state(abstract, nnx.Param),
                                               is_leaf=qw.is_quantized))
