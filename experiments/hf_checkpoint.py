"""Hugging Face LLaMA / Qwen2 checkpoints in and out of memjax's :class:`memjax.models.lm.LM`.

A checkpoint is a local folder as ``transformers`` writes it: ``config.json`` and
``model.safetensors`` (or shards ``model-0000i-of-0000n.safetensors`` listed in
``model.safetensors.index.json``). Nothing is downloaded.

* :func:`load_pretrained` reads a ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` folder tensor by
  tensor into an NNX ``LM`` whose forward gives transformers' logits. The model's shape comes
  from ``config.json`` (:func:`config_from_hf`); each stacked parameter is filled layer by layer
  in place, so the weights are never held twice.
* :func:`save_pretrained` writes a folder that ``transformers.AutoModelForCausalLM`` (and
  :func:`load_pretrained`) loads with the same logits: a model with q/k/v biases as
  ``Qwen2ForCausalLM``, otherwise as ``LlamaForCausalLM``.

The correspondence of names and layouts is the pure function :func:`tensor_map`: Hugging Face
stores ``nn.Linear`` weights as ``(out, in)``, memjax's kernels are ``(in, out)`` with a leading
``layers`` axis on the stacked blocks. Both use the "rotate half" RoPE layout, so q/k need no
permutation.

A config field whose meaning memjax does not implement (rope scaling, sliding windows, biases
other than Qwen2's q/k/v, another activation, a head size other than ``hidden_size / heads``,
quantisation) raises a ``ValueError`` naming the field, rather than loading a model that computes
something else.

References: Touvron et al., "LLaMA", arXiv 2302.13971 (2023); Qwen Team, "Qwen2 Technical
Report", arXiv 2407.10671 (2024).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from memjax.models.lm import LM, LMConfig

__all__ = [
    "ARCHITECTURES",
    "TensorSpec",
    "config_from_hf",
    "hf_config",
    "load_params",
    "load_pretrained",
    "read_config",
    "save_params",
    "save_pretrained",
    "tensor_map",
]

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_SINGLE_FILE, _INDEX = "model.safetensors", "model.safetensors.index.json"


# ----------------------------------------------------------------------------- configs


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """``rope_theta`` of either config layout (transformers < 5: ``rope_theta`` and
    ``rope_scaling``; >= 5: ``rope_parameters``), refusing any scaled RoPE."""
    params = hf.get("rope_parameters")
    if params is not None:
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: rope_parameters.rope_type="
                             f"{params.get('rope_type')!r} is not implemented by memjax (only "
                             f"the default RoPE); this checkpoint cannot be loaded faithfully.")
        return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    if hf.get("rope_scaling") is not None:
        raise ValueError(f"config.json: rope_scaling={hf['rope_scaling']!r} is not implemented "
                         f"by memjax (only the default RoPE).")
    return float(hf.get("rope_theta", 10_000.0))


def _refuse(hf: Mapping[str, Any], field: str, allowed: Any, why: str) -> None:
    value = hf.get(field, allowed)
    if value != allowed:
        raise ValueError(f"config.json: {field}={value!r} is not supported ({why}); memjax "
                         f"implements {field}={allowed!r}.")


def config_from_hf(hf: Mapping[str, Any], *, dtype: Any = None) -> LMConfig:
    """The :class:`LMConfig` of a Hugging Face ``config.json`` (a dict). Pure.

    Args:
      hf: the parsed ``config.json`` of a ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``.
      dtype: parameter and computation dtype; ``None``: the checkpoint's (``torch_dtype`` /
        ``dtype``, float32 if absent).

    Raises:
      ValueError: another architecture, or a field memjax would silently ignore (named).
    """
    architectures = hf.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise ValueError(f"config.json: architectures={architectures!r} is not supported; "
                         f"memjax loads one of {ARCHITECTURES}.")
    qwen2 = architectures[0] == "Qwen2ForCausalLM"
    _refuse(hf, "hidden_act", "silu", "the MLP is SwiGLU with SiLU")
    _refuse(hf, "quantization_config", None, "load a float checkpoint")
    if qwen2:
        _refuse(hf, "use_sliding_window", False, "attention is full causal")
    else:
        _refuse(hf, "attention_bias", False, "LLaMA projections without biases")
        _refuse(hf, "mlp_bias", False, "MLP without biases")
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"config.json: layer_types={layer_types!r} is not supported; memjax "
                         f"implements full causal attention in every layer.")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("head_dim") is not None and int(hf["head_dim"]) * heads != hidden:
        raise ValueError(f"config.json: head_dim={hf['head_dim']} with num_attention_heads="
                         f"{heads} does not give hidden_size={hidden}; memjax's head size is "
                         f"hidden_size / num_attention_heads.")
    if dtype is None:
        name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        if name not in _DTYPES:
            raise ValueError(f"config.json: dtype {name!r} is not one of {sorted(_DTYPES)}; "
                             f"pass dtype= to load_pretrained.")
        dtype = name
    return LMConfig(
        vocab_size=int(hf["vocab_size"]), d_model=hidden, num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, ffn_dim=int(hf["intermediate_size"]),
        max_length=int(hf.get("max_position_embeddings", 2048)), mixer="attention",
        mixer_kwargs={"rope_base": _rope_theta(hf),
                      "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
                      "qkv_bias": qwen2},
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), dtype=dtype, param_dtype=dtype)


def _attention_options(config: LMConfig) -> tuple[int, bool, float]:
    kwargs = dict(config.mixer_kwargs)
    return (int(kwargs.get("num_kv_heads") or config.num_heads), bool(kwargs.get("qkv_bias")),
            float(kwargs.get("rope_base", 10_000.0)))


def hf_config(config: LMConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` (a dict) of an attention :class:`LMConfig`. Pure.

    ``Qwen2ForCausalLM`` when the model has q/k/v biases, else ``LlamaForCausalLM``.
    """
    if config.mixer != "attention":
        raise ValueError(f"only the attention mixer has a Hugging Face counterpart, got "
                         f"mixer={config.mixer!r}.")
    if config.weight_bits is not None:
        raise ValueError("save INT8-weight models after dequantising them (weight_bits=None).")
    known = {"rope_base", "num_kv_heads", "qkv_bias", "dtype", "param_dtype"}
    unknown = set(config.mixer_kwargs) - known
    if unknown:
        raise ValueError(f"mixer_kwargs {sorted(unknown)} have no Hugging Face counterpart.")
    kv_heads, bias, theta = _attention_options(config)
    dtype = jnp.dtype(config.param_dtype).name
    out = {
        "architectures": ["Qwen2ForCausalLM" if bias else "LlamaForCausalLM"],
        "model_type": "qwen2" if bias else "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_length, "rms_norm_eps": config.norm_eps,
        "rope_theta": theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": config.tie_embeddings, "torch_dtype": dtype, "dtype": dtype,
        "attention_dropout": 0.0, "use_cache": True,
    }
    if bias:
        out.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=config.num_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return out


# ----------------------------------------------------------------------------- names


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One memjax parameter and the Hugging Face tensor(s) it holds.

    Attributes:
      path: keys of the parameter in ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``.
      name: the Hugging Face tensor name; with ``{i}`` for a stacked block parameter, whose
        layer ``i`` is ``value[i]``.
      transpose: Hugging Face stores the transpose (an ``nn.Linear`` weight, ``(out, in)``).
    """

    path: tuple[str, ...]
    name: str
    transpose: bool

    @property
    def stacked(self) -> bool:
        return "{i}" in self.name


def tensor_map(config: LMConfig) -> list[TensorSpec]:
    """Every parameter of an attention ``LM`` with its Hugging Face tensor name. Pure."""
    _, bias, _ = _attention_options(config)
    layer = "model.layers.{i}."
    specs = [TensorSpec(("embed", "embedding"), "model.embed_tokens.weight", False),
             TensorSpec(("final_norm", "scale"), "model.norm.weight", False),
             TensorSpec(("blocks", "mixer_norm", "scale"), layer + "input_layernorm.weight", False),
             TensorSpec(("blocks", "mlp_norm", "scale"),
                        layer + "post_attention_layernorm.weight", False)]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        specs.append(TensorSpec(("blocks", "mixer", proj, "kernel"),
                                f"{layer}self_attn.{proj}.weight", True))
        if bias and proj != "o_proj":
            specs.append(TensorSpec(("blocks", "mixer", proj, "bias"),
                                    f"{layer}self_attn.{proj}.bias", False))
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        specs.append(TensorSpec(("blocks", "mlp", ours, "kernel"), f"{layer}mlp.{theirs}.weight",
                                True))
    if not config.tie_embeddings:
        specs.append(TensorSpec(("lm_head", "kernel"), "lm_head.weight", True))
    return specs


# ----------------------------------------------------------------------------- I/O


class _Reader:
    """Tensors of a checkpoint folder by name, from one file or the shards of an index."""

    def __init__(self, folder: pathlib.Path):
        if (folder / _INDEX).exists():
            weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
        elif (folder / _SINGLE_FILE).exists():
            with safe_open(folder / _SINGLE_FILE, framework="flax") as f:
                weight_map = {name: _SINGLE_FILE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{folder} holds neither {_SINGLE_FILE} nor {_INDEX}.")
        self.folder, self.weight_map, self.files = folder, weight_map, {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.folder}.")
        file = self.weight_map[name]
        if file not in self.files:
            self.files[file] = safe_open(self.folder / file, framework="flax")
        return np.asarray(self.files[file].get_tensor(name))

    def close(self) -> None:
        for f in self.files.values():
            f.__exit__(None, None, None)


def _read(reader: _Reader, spec: TensorSpec, target: jax.ShapeDtypeStruct,
          layers: int) -> jax.Array:
    """The parameter of ``spec``, filled layer by layer into one buffer of the target dtype."""
    dtype = np.dtype(target.dtype)
    out = np.empty(target.shape, dtype)
    for i in range(layers if spec.stacked else 1):
        tensor = reader.get(spec.name.format(i=i))
        tensor = tensor.T if spec.transpose else tensor
        dest = out[i] if spec.stacked else out
        if tensor.shape != dest.shape:
            stored, implied = ((tensor.shape[::-1], dest.shape[::-1]) if spec.transpose
                               else (tensor.shape, dest.shape))
            raise ValueError(f"tensor {spec.name.format(i=i)!r} has shape {stored}; "
                             f"config.json implies {implied}.")
        dest[...] = tensor.astype(dtype, copy=False)
    return out


def _nested_get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _nested_set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def read_config(path: str | pathlib.Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder."""
    file = pathlib.Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist (path={str(path)!r} must be a Hugging "
                                f"Face checkpoint folder).")
    return json.loads(file.read_text())


def load_params(path: str | pathlib.Path, config: LMConfig) -> dict:
    """The parameters of ``LM(config)`` (a pure dict, ``nnx.to_pure_dict`` of its ``nnx.Param``
    state; host arrays) read from the checkpoint folder ``path``, in ``config.param_dtype``.
    ``config`` must have the checkpoint's shape (:func:`config_from_hf`); its runtime fields
    (``max_length``, ``remat``, ``dtype``) are free."""
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    targets = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    values = jax.tree.map(lambda x: None, targets)
    reader = _Reader(pathlib.Path(path))
    try:
        for spec in tensor_map(config):
            target = _nested_get(targets, spec.path)
            _nested_set(values, spec.path, _read(reader, spec, target, config.num_layers))
    finally:
        reader.close()
    return values


def load_pretrained(path: str | pathlib.Path, dtype: Any = None) -> LM:
    """An :class:`LM` with the weights of a local Hugging Face LLaMA / Qwen2 checkpoint.

    Args:
      path: the checkpoint folder (``config.json`` + ``*.safetensors``).
      dtype: parameter and computation dtype (e.g. ``"float32"`` to train a bfloat16 checkpoint
        in float32); ``None`` keeps the checkpoint's.

    Returns:
      The model; ``model(tokens)`` gives transformers' logits (float32).

    Raises:
      FileNotFoundError: no ``config.json`` or weights in ``path``.
      ValueError: an unsupported architecture or config field (named), or a tensor whose shape
        does not match ``config.json``.

    Example:
      >>> model = load_pretrained("tests/fixtures/hf/qwen2_tied")  # doctest: +SKIP
      >>> model(jnp.zeros((1, 8), jnp.int32)).shape  # doctest: +SKIP
      (1, 8, 64)
    """
    config = config_from_hf(read_config(path), dtype=dtype)
    values = load_params(path, config)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0))),
                                       nnx.Param, ...)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, values))
    return nnx.merge(graphdef, params, rest)


def _tensors(config: LMConfig, values: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    for spec in tensor_map(config):
        value = np.asarray(_nested_get(values, spec.path))
        for i in range(config.num_layers if spec.stacked else 1):
            tensor = value[i] if spec.stacked else value
            yield spec.name.format(i=i), np.ascontiguousarray(tensor.T if spec.transpose
                                                              else tensor)


def save_pretrained(model: LM, path: str | pathlib.Path) -> None:
    """Write ``model`` as a Hugging Face checkpoint folder (``config.json`` + one
    ``model.safetensors``) that ``transformers.AutoModelForCausalLM.from_pretrained`` and
    :func:`load_pretrained` load with the same logits.

    Args:
      model: an attention :class:`LM` with float weights.
      path: the folder (created; existing files of the same names are replaced).

    Raises:
      ValueError: a model with no Hugging Face counterpart (another mixer, INT8 weights, mixer
        options that transformers does not have).
    """
    save_params(model.config, nnx.to_pure_dict(nnx.state(model, nnx.Param)), path)


def save_params(config: LMConfig, params: Mapping, path: str | pathlib.Path) -> None:
    """:func:`save_pretrained` of ``LM(config)`` with the parameters ``params`` (a pure dict, as
    the trainer holds them)."""
    hf = hf_config(config)
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(_tensors(config, params)), folder / _SINGLE_FILE, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
