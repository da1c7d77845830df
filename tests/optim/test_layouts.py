"""The default labels on the layouts of the JAX model libraries (issue 28): Flax NNX and linen
attention (``LinearGeneral`` / ``DenseGeneral`` kernels), layer stacks from ``nnx.vmap`` and
``nn.scan`` (axis 0 and 1), MaxText's LLaMA decoder at ``param_scan_axis`` 1 and 0, optax's
dimension numbers. Shape-only (``jax.eval_shape``) except one short NNX training run."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import memjax
from memjax.optim import MatrixDims, describe, label_matrices, layouts

D, HEADS, HEAD_DIM, FFN, LAYERS, VOCAB = 64, 4, 16, 256, 3, 512
Q = MatrixDims(0, (1, 2))  # (d, heads, head_dim): d x heads*head_dim
OUT = MatrixDims((0, 1), 2)  # (heads, head_dim, d): heads*head_dim x d


def _flat(tree):
    is_leaf = lambda x: x is None or isinstance(x, MatrixDims)  # noqa: E731
    return {memjax.optim.labels.path_str(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _leaf_paths(params):
    return [memjax.optim.labels.path_str(p) for p, _ in
            jax.tree_util.tree_flatten_with_path(params)[0]]


def _dims(label):
    return None if label is None else (label.reduction_axis, label.output_axis)


def _shift(dims, layer_axis):
    """``dims`` of an unstacked kernel, with a layer axis inserted at ``layer_axis``."""
    move = lambda a: tuple(move(x) for x in a) if isinstance(a, tuple) else a + (a >= layer_axis)  # noqa: E731
    return move(dims[0]), move(dims[1])


def _state_bytes(tx, params):
    return memjax.optim.state_bytes(jax.eval_shape(tx.init, params))


def _assert_rule_equals(params, expected, **kw):
    """The default labels of ``params`` are ``expected`` (path -> (rows, cols) or None), and a
    GaLore state built from them holds the bytes of one built from ``expected`` by hand."""
    labels = jax.tree_util.tree_structure(params).flatten_up_to(label_matrices(params, **kw))
    assert dict(zip(_leaf_paths(params), map(_dims, labels))) == expected
    explicit = jax.tree_util.tree_structure(params).unflatten(
        [None if expected[k] is None else MatrixDims(*expected[k]) for k in _leaf_paths(params)])
    rule = memjax.optim.galore(1e-2, rank=4)
    by_hand = memjax.optim.galore(1e-2, rank=4, labels=explicit)
    assert _state_bytes(rule, params) == _state_bytes(by_hand, params)
    adam = _state_bytes(optax.adam(1e-2), params)
    assert _state_bytes(rule, params) < 0.7 * adam


def _nnx_params(module_fn):
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(module_fn), nnx.Param))


def test_nnx_multi_head_attention_kernels_group_around_the_width():
    params = _nnx_params(lambda: nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=D, qkv_features=HEADS * HEAD_DIM, decode=False,
        rngs=nnx.Rngs(0)))
    q = (Q.reduction_axis, Q.output_axis)
    _assert_rule_equals(params, {
        "key/bias": None, "key/kernel": q, "out/bias": None,
        "out/kernel": (OUT.reduction_axis, OUT.output_axis), "query/bias": None,
        "query/kernel": q, "value/bias": None, "value/kernel": q})
    rows = {r.path: r for r in describe(memjax.optim.galore(1e-2, rank=4), params).rows}
    assert rows["query/kernel"].matrix == "64 x 4*16" and rows["out/kernel"].matrix == "4*16 x 64"
    assert rows["query/kernel"].treatment == "projected" and rows["query/kernel"].rank == 4
    assert rows["out/bias"].reason == "one axis"
    assert rows["query/bias"].reason == "excluded by name (DEFAULT_EXCLUDE)"


class _Block(nnx.Module):
    def __init__(self, d, ffn, rngs):
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=d, decode=False,
                                           use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, ffn, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(ffn, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        h = self.norm(x)
        x = x + self.attn(h, h)
        return x + self.down(jax.nn.gelu(self.up(x)))


class _Model(nnx.Module):
    """An embedding, ``LAYERS`` blocks stacked by ``nnx.vmap`` and run by ``nnx.scan``, a head."""

    def __init__(self, rngs, vocab=VOCAB, d=D, ffn=FFN, layers=LAYERS):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)

        @nnx.vmap(in_axes=0, out_axes=0)
        def blocks(key):
            return _Block(d, ffn, nnx.Rngs(key))

        self.layers = blocks(jax.random.split(rngs.params(), layers))
        self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        return self.lm_head(run(self.embed(tokens), self.layers))


@pytest.mark.slow
def test_nnx_vmap_stack_is_read_layer_by_layer_and_trains_through_nnx_optimizer():
    params = _nnx_params(lambda: _Model(nnx.Rngs(0)))
    q, out = _shift((0, (1, 2)), 0), _shift(((0, 1), 2), 0)
    _assert_rule_equals(params, {
        "embed/embedding": None, "lm_head/kernel": None,
        "layers/attn/key/kernel": q, "layers/attn/out/kernel": out,
        "layers/attn/query/kernel": q, "layers/attn/value/kernel": q,
        "layers/down/kernel": (1, 2), "layers/up/kernel": (1, 2), "layers/norm/scale": None})
    rows = {r.path: r for r in describe(memjax.optim.galore(1e-2, rank=4), params).rows}
    assert rows["layers/attn/query/kernel"].matrix == "layers=3 | 64 x 4*16"

    model = _Model(nnx.Rngs(0), vocab=32, d=16, ffn=32, layers=2)  # small: a short compile
    optimizer = nnx.Optimizer(model, memjax.optim.galore(3e-2, rank=2, update_proj_gap=2),
                              wrt=nnx.Param)
    assert describe(optimizer.tx, nnx.state(model, nnx.Param)).num_projected == 6
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 32)

    def loss_fn(m):
        logits = m(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(6)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, use_bias=False)(
            nn.RMSNorm()(x))
        return x + nn.Dense(D, use_bias=False)(nn.gelu(nn.Dense(FFN, use_bias=False)(x))), None


@pytest.mark.parametrize("axis", [0, 1])
def test_linen_scan_stack_on_either_axis(axis):
    stack = nn.scan(_LinenBlock, variable_axes={"params": axis}, split_rngs={"params": True},
                    length=LAYERS)
    params = jax.eval_shape(lambda: stack().init(jax.random.key(0), jnp.zeros((2, 8, D)),
                                                 None))["params"]
    att = "MultiHeadDotProductAttention_0/"
    q, out = _shift((0, (1, 2)), axis), _shift(((0, 1), 2), axis)
    mlp = _shift((0, 1), axis)
    _assert_rule_equals(params, {
        "Dense_0/kernel": mlp, "Dense_1/kernel": mlp, "RMSNorm_0/scale": None,
        att + "key/kernel": q, att + "out/kernel": out, att + "query/kernel": q,
        att + "value/kernel": q})


# MaxText's LLaMA-2 decoder (MaxText/layers/{llama2,attentions,linears,embeddings}.py): kernel
# names and logical axes; nn.scan inserts the "layers" axis at config.param_scan_axis (default 1).
KV_HEADS = 2
MAXTEXT = {  # path: (shape, logical axes) of one unscanned layer, or of a top-level leaf
    "token_embedder/embedding": ((VOCAB, D), ("vocab", "embed")),
    "decoder/decoder_norm/scale": ((D,), ("norm",)),
    "decoder/logits_dense/kernel": ((D, VOCAB), ("embed", "vocab")),
    "layers/pre_self_attention_layer_norm/scale": ((D,), ("norm",)),
    "layers/post_self_attention_layer_norm/scale": ((D,), ("norm",)),
    "layers/self_attention/query/kernel": ((D, HEADS, HEAD_DIM), ("embed", "q_heads", "kv")),
    "layers/self_attention/key/kernel": ((D, KV_HEADS, HEAD_DIM),
                                         ("embed", "kv_heads", "kv_head_dim")),
    "layers/self_attention/value/kernel": ((D, KV_HEADS, HEAD_DIM),
                                           ("embed", "kv_heads", "kv_head_dim")),
    "layers/self_attention/out/kernel": ((HEADS, HEAD_DIM, D), ("heads", "kv", "embed")),
    "layers/mlp/wi_0/kernel": ((D, FFN), ("embed", "mlp")),
    "layers/mlp/wi_1/kernel": ((D, FFN), ("embed", "mlp")),
    "layers/mlp/wo/kernel": ((FFN, D), ("mlp", "embed")),
}


def _maxtext(scan_axis):
    """MaxText's parameter tree (shapes) and logical axes with layers scanned at ``scan_axis``."""
    params, names = {}, {}
    for path, (shape, axes) in MAXTEXT.items():
        if path.startswith("layers/"):
            path = "decoder/" + path
            shape = shape[:scan_axis] + (LAYERS,) + shape[scan_axis:]
            axes = axes[:scan_axis] + ("layers",) + axes[scan_axis:]
        *parents, leaf = path.split("/")
        p, n = params, names
        for key in parents:
            p, n = p.setdefault(key, {}), n.setdefault(key, {})
        p[leaf], n[leaf] = jax.ShapeDtypeStruct(shape, jnp.float32), axes
    return params, names


@pytest.mark.parametrize("scan_axis", [1, 0])
@pytest.mark.parametrize("named", [False, True])
def test_maxtext_decoder_layout(scan_axis, named):
    params, names = _maxtext(scan_axis)
    s = lambda dims: _shift(dims, scan_axis)  # noqa: E731
    layer = "decoder/layers/"
    expected = {k: None for k in _leaf_paths(params)}
    expected.update({
        layer + "self_attention/query/kernel": s((0, (1, 2))),
        layer + "self_attention/key/kernel": s((0, (1, 2))),
        layer + "self_attention/value/kernel": s((0, (1, 2))),
        layer + "self_attention/out/kernel": s(((0, 1), 2)),
        layer + "mlp/wi_0/kernel": s((0, 1)), layer + "mlp/wi_1/kernel": s((0, 1)),
        layer + "mlp/wo/kernel": s((0, 1))})
    _assert_rule_equals(params, expected, **({"logical_axes": names} if named else {}))


def test_layouts_report_layer_axes_and_how_they_were_found():
    params, names = _maxtext(1)
    found = dict(zip(_flat(params), layouts.layouts(params)))
    query = found["decoder/layers/self_attention/query/kernel"]
    assert (query.layers, query.rows, query.cols, query.how) == ((1,), (0,), (2, 3), "width")
    assert query.describe((D, LAYERS, HEADS, HEAD_DIM)) == "layers=3 | 64 x 4*16"
    by_name = dict(zip(_flat(params), layouts.layouts(params, names)))
    assert by_name["decoder/layers/self_attention/query/kernel"].how == "names"
    down, _, fused, _ = layouts.layouts({
        "gate_up": jnp.zeros((2, D, FFN)), "down": jnp.zeros((FFN, D)),
        "embed": jnp.zeros((VOCAB, D)), "norm": jnp.zeros((D,))})
    assert fused == layouts.Layout((), (0,), (1,), (2,), "width")  # two d x f matrices
    assert down == layouts.Layout((), (), (0,), (1,), "last two")
    conv = layouts.layouts({"conv": jnp.zeros((3, 3, 8, 16))})[0]
    assert (conv.batch, conv.rows, conv.cols, conv.how) == ((0, 1), (2,), (3,), "last two")
    with pytest.raises(ValueError, match="logical_axes: leaf 'w' of shape \\(4, 4\\) has 1"):
        layouts.layouts({"w": jnp.zeros((4, 4))}, {"w": ("embed",)})


@pytest.mark.parametrize("numbers", ["GaLoreDimensionNumbers", "MuonDimensionNumbers"])
def test_optax_dimension_numbers_are_labels(numbers):
    dims = getattr(optax.contrib, numbers)
    params = {"q": jnp.ones((D, HEADS, HEAD_DIM)), "w": jnp.ones((D, FFN)), "b": jnp.ones((D,))}
    theirs = {"q": dims(0, (1, 2)), "w": dims(0, 1), "b": None}
    ours = {"q": MatrixDims(0, (1, 2)), "w": MatrixDims(0, 1), "b": None}
    grads = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
    a, b = (memjax.optim.galore(1e-2, rank=4, labels=lab) for lab in (theirs, ours))
    ua, _ = a.update(grads, a.init(params), params)
    ub, _ = b.update(grads, b.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, ua, ub)
    rows = {r.path: r for r in describe(a, params, labels=theirs).rows}
    assert rows["q"].matrix == "64 x 64" and rows["q"].treatment == "projected"


def test_equinox_linear_out_in_and_filter_vmap_stacks():
    """equinox stores ``Linear.weight`` as ``(out, in)``: a 2-D matrix either way round; a
    ``filter_vmap`` stack puts the layer axis first."""
    keys = jax.random.split(jax.random.key(0), LAYERS)

    def model():
        attention = eqx.nn.MultiheadAttention(HEADS, D, key=jax.random.key(1))
        mlp = eqx.filter_vmap(lambda k: eqx.nn.MLP(D, D, FFN, depth=1, key=k))(keys)
        return {"attention": attention, "mlp": mlp, "embed": eqx.nn.Embedding(VOCAB, D,
                                                                               key=keys[0])}

    params = eqx.filter(eqx.filter_eval_shape(model),
                        lambda x: isinstance(x, jax.ShapeDtypeStruct))
    expected = {k: None for k in _leaf_paths(params)}
    for proj in ("query_proj", "key_proj", "value_proj", "output_proj"):
        expected[f"attention/{proj}/weight"] = (0, 1)
    expected.update({"mlp/layers/0/weight": (1, 2), "mlp/layers/1/weight": (1, 2)})
    _assert_rule_equals(params, expected)
    rows = {r.path: r for r in describe(memjax.optim.galore(1e-2, rank=4), params).rows}
    assert rows["mlp/layers/0/weight"].matrix == f"layers={LAYERS} | {FFN} x {D}"
