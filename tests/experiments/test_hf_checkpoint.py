"""Hugging Face checkpoints in and out (experiments.hf_checkpoint), without network or torch.

The fixtures under ``tests/fixtures/hf`` were written by transformers 5.24 with its own logits
(``tests/fixtures/hf/make_fixtures.py``, not run here): ``llama_gqa`` (LlamaForCausalLM, grouped-
query attention, rope_theta 5e5, eps 1e-5, untied head, sharded files) and ``qwen2_tied``
(Qwen2ForCausalLM, q/k/v biases, GQA, tied embeddings). Tolerance: float32 logits at rtol 1e-5
(atol 1e-5 for entries near zero; the logits are O(1)).
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.hf_checkpoint import (
    config_from_hf,
    hf_config,
    load_pretrained,
    save_pretrained,
    tensor_map,
)
from memjax.models.attention import CausalSelfAttention
from memjax.models.lm import LM, LMConfig

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "hf"
F32 = dict(rtol=1e-5, atol=1e-5)


def reference(name):
    data = np.load(FIXTURES / name / "reference.npz")
    return jnp.asarray(data["tokens"], jnp.int32), data["logits"]


@pytest.fixture(scope="module", params=["llama_gqa", "qwen2_tied"])
def loaded(request):
    return request.param, load_pretrained(FIXTURES / request.param)


def test_logits_equal_transformers(loaded):
    name, model = loaded
    tokens, expected = reference(name)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda t: model(t))(tokens)), expected, **F32)
    kwargs = model.config.mixer_kwargs
    assert kwargs["num_kv_heads"] == 2 and kwargs["qkv_bias"] == (name == "qwen2_tied")
    assert model.config.tie_embeddings == (name == "qwen2_tied")
    assert model.config.norm_eps == {"llama_gqa": 1e-5, "qwen2_tied": 1e-6}[name]


def test_cached_decoding_matches_the_forward_with_gqa(loaded):
    name, model = loaded
    tokens, expected = reference(name)
    batch, length = tokens.shape

    @jax.jit
    def stepped(tokens):
        def body(cache, inputs):
            logits, cache = model.decode_step(inputs[0], cache, inputs[1])
            return cache, logits

        _, logits = jax.lax.scan(body, model.init_cache(batch, length),
                                 (tokens.T, jnp.arange(length)))
        return jnp.swapaxes(logits, 0, 1)

    np.testing.assert_allclose(np.asarray(stepped(tokens)), expected, rtol=1e-5, atol=2e-5)


def test_save_then_load_is_exact(loaded, tmp_path):
    name, model = loaded
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((FIXTURES / name / "config.json").read_text())
    assert written["architectures"] == original["architectures"]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                  "tie_word_embeddings"):
        assert written[field] == original[field], field
    again = load_pretrained(tmp_path)
    assert again.config == model.config
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                        nnx.state(model, nnx.Param), nnx.state(again, nnx.Param))
    assert all(jax.tree.leaves(same))


def test_dtype_override():
    tokens, expected = reference("qwen2_tied")
    model = load_pretrained(FIXTURES / "qwen2_tied", dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("bfloat16")}
    np.testing.assert_allclose(np.asarray(model(tokens)), expected, rtol=0.05, atol=0.15)


@pytest.mark.parametrize("tie, bias", [(False, False), (True, True), (True, False)])
def test_tensor_map_names_every_parameter_once(tie, bias):
    config = LMConfig(64, 32, 2, 4, 48, tie_embeddings=tie,
                      mixer_kwargs={"rope_base": 1e4, "num_kv_heads": 2, "qkv_bias": bias})
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0))),
                                        nnx.Param))
    paths = {tuple(str(k.key) for k in path)
             for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    specs = tensor_map(config)
    assert {s.path for s in specs} == paths and len(specs) == len(paths)
    assert len({s.name for s in specs}) == len(specs)
    assert config_from_hf(hf_config(config), dtype="float32") == config


def _write_config(folder, source, **changes):
    for file in (FIXTURES / source).iterdir():
        if file.name != "config.json":
            shutil.copy(file, folder / file.name)
    config = json.loads((FIXTURES / source / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, match", [
    (dict(architectures=["MistralForCausalLM"]), "architectures"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_type"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=16), "head_dim"),
    (dict(intermediate_size=40), "mlp.gate_proj.weight"),
])
def test_unsupported_or_inconsistent_checkpoints_are_refused(tmp_path, changes, match):
    folder = _write_config(tmp_path, "llama_gqa", **changes)
    with pytest.raises(ValueError, match=match):
        load_pretrained(folder)


def test_missing_files_and_unsavable_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((FIXTURES / "llama_gqa" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)
    mamba = nnx.eval_shape(lambda: LM(LMConfig(64, 32, 1, 4, 48, mixer="mamba"),
                                      rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="mixer"):
        save_pretrained(mamba, tmp_path / "out")


@pytest.mark.slow
def test_grouped_query_attention_equals_multi_head_with_shared_heads():
    """Independent reference: GQA with K = 2 of H = 4 heads is multi-head attention whose k / v
    projections repeat each of the K heads' columns for its H / K query heads."""
    d, heads, kv, head_dim = 32, 4, 2, 8
    gqa = CausalSelfAttention(d, heads, num_kv_heads=kv, qkv_bias=True, rngs=nnx.Rngs(0))
    for proj in (gqa.q_proj, gqa.k_proj, gqa.v_proj):
        proj.bias[...] = jax.random.normal(jax.random.key(1), proj.bias.shape)
    mha = CausalSelfAttention(d, heads, qkv_bias=True, rngs=nnx.Rngs(0))

    def repeat(w):  # (..., K * D) -> (..., H * D), head k's block repeated H / K times
        w = w.reshape(w.shape[:-1] + (kv, 1, head_dim))
        return jnp.broadcast_to(w, w.shape[:-3] + (kv, heads // kv, head_dim)).reshape(
            w.shape[:-3] + (heads * head_dim,))

    mha.q_proj.kernel[...], mha.q_proj.bias[...] = gqa.q_proj.kernel[...], gqa.q_proj.bias[...]
    mha.o_proj.kernel[...] = gqa.o_proj.kernel[...]
    for ours, theirs in ((mha.k_proj, gqa.k_proj), (mha.v_proj, gqa.v_proj)):
        ours.kernel[...], ours.bias[...] = repeat(theirs.kernel[...]), repeat(theirs.bias[...])
    x = jax.random.normal(jax.random.key(2), (2, 7, d))
    np.testing.assert_allclose(np.asarray(gqa(x)), np.asarray(mha(x)), rtol=1e-5, atol=1e-6)
    assert gqa.init_cache(1, 5).k.shape == (1, 5, kv, head_dim)
    with pytest.raises(ValueError, match="num_kv_heads"):
        CausalSelfAttention(d, heads, num_kv_heads=3, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_readme_fine_tuning_example_runs(monkeypatch):
    from tests.readme import README, run_block

    monkeypatch.chdir(README.parent)
    namespace = run_block('load_pretrained("tests/fixtures/hf/qwen2_tied")')
    losses = float(namespace["loss"])
    assert np.isfinite(losses)
    tuned = nnx.merge(namespace["graphdef"], namespace["params"], namespace["rest"])
    again = load_pretrained("/tmp/memjax-finetuned")
    tokens, _ = reference("qwen2_tied")
    np.testing.assert_array_equal(np.asarray(again(tokens)), np.asarray(tuned(tokens)))
