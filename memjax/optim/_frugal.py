"""FRUGAL (Zmushko et al., arXiv 2411.07837): Adam in a subspace, a state-free step outside it."""

from __future__ import annotations

from typing import Any

import jax
import optax

from memjax.optim import _checks, block_adam
from memjax.optim import labels as labels_lib
from memjax.optim import projectors as proj_lib
from memjax.optim import recipe
from memjax.optim import residual as residual_lib
from memjax.optim.low_rank import scale_by_low_rank

SUBSPACES = ("svd", "random", "columns", "rows", "block")


def _tree_dependent(build, check=None) -> optax.GradientTransformationExtraArgs:
    """A transform whose composition depends on the tree's static shapes (rebuilt per trace);
    ``check(params)`` runs once, at ``init``."""

    def init_fn(params):
        if check is not None:
            check(params)
        return build(params).init(params)

    def update_fn(updates, state, params=None, **extra_args):
        return build(updates).update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _label_leaves(tree, labels) -> list:
    """The ``MatrixDims`` (or ``None``) of every leaf of ``tree``, validated (rule labels whose
    matrix has a side of 1 fall back to ``None``)."""
    label_tree = labels_lib.label_tree(tree, labels)
    views = labels_lib.resolve_labels(tree, label_tree, 1)  # validates (raises named errors)
    leaves = jax.tree.structure(tree).flatten_up_to(label_tree)
    out = []
    for lab, view in zip(leaves, views):
        if view is None:
            out.append(None)
        elif lab is True:
            out.append(labels_lib.MatrixDims())
        else:
            out.append(labels_lib.MatrixDims(lab.reduction_axis, lab.output_axis))
    return out


def _frugal_rank(view, density: float, subspace: str) -> int | None:
    """Rank of the state-full subspace of one matrix, ``None`` if it is the whole matrix."""
    size = {"columns": view.n, "rows": view.m}.get(subspace, min(view.m, view.n))
    rank = max(1, round(density * size))
    if rank >= size:
        return None
    return min(rank, view.m, view.n)


def frugal(
    learning_rate: optax.ScalarOrSchedule,
    density: float = 0.25,
    subspace: str = "svd",
    order: str = "descending",
    state_free: str = "sign",
    state_free_lr: float = 1.0,
    update_proj_gap: int = 200,
    reset_state_on_refresh: bool = True,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    labels: labels_lib.Labels = None,
    *,
    inner: optax.GradientTransformation | None = None,
    weight_decay_mask: Any = None,
    seed: int = 0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""FRUGAL: Adam in a subspace of each matrix, a state-free optimizer on the rest.

    For a matrix leaf with gradient ``G``, a subspace with ``up``/``down`` (refreshed every
    ``T = update_proj_gap`` steps), ``R = down(G)`` and Adam on ``R``:

    .. math::
      W \leftarrow W (1 - \eta_t \lambda) - \eta_t \big(\mathrm{up}(\mathrm{Adam}(R))
      + \rho\, f(G - \mathrm{up}(R))\big), \qquad f = \mathrm{sign} \text{ or } \mathrm{id}
      \text{ or } 0

    with the subspace ``subspace``:

    * ``"svd"``: top singular vectors of ``G`` (GaLore side rule), rank
      ``round(density * min(m, n))``;
    * ``"random"``: a random orthonormal basis of the same rank (only a key is stored);
    * ``"columns"`` / ``"rows"``: ``round(density * n)`` random columns (``density * m`` rows);
    * ``"block"``: BAdam-like, ``max(1, round(density * K))`` of the ``K`` matrix leaves are
      entirely state-full (Adam), chosen in ``order`` (``"random"``, ``"ascending"``,
      ``"descending"``, ``"mirror"``) and switched every ``T`` steps; the others are entirely
      state-free. Only the active matrices' moments are stored: two float32 buffers as large as
      the largest active set (:class:`memjax.optim.BlockState`,
      :func:`memjax.optim.scale_by_block_adam`), which
      :func:`memjax.optim.state_shardings` splits over the parameters' devices.

    Adam (``optax.scale_by_adam`` form: the torch ``AdamW`` of the authors' code) restarts from zero
    moments and step count at every subspace change when ``reset_state_on_refresh`` (the authors'
    ``reset_statistics``). Leaves that are not matrices (embeddings, heads, norms, biases: see
    :func:`memjax.optim.label_matrices`) and matrices whose subspace would be the whole matrix
    get plain Adam. Weight decay is applied to the old weights, as ``torch.optim.AdamW`` does.

    Args:
      learning_rate: ``lr`` or an optax schedule.
      density: fraction of each matrix (or of the matrices, ``"block"``) that is state-full, in
        ``(0, 1]``.
      subspace: ``"svd"``, ``"random"``, ``"columns"``, ``"rows"`` or ``"block"``.
      order: block order for ``subspace="block"`` (authors' ``block_order``).
      state_free: ``"sign"`` (signSGD, default), ``"sgd"``, or ``"none"`` (GaLore-like).
      state_free_lr: the state-free learning rate as a *multiple* of ``learning_rate`` (the
        authors' ``inactive_lr_scale``): the state-free part moves by
        ``learning_rate(t) * state_free_lr`` per step and follows the same schedule.
      update_proj_gap: subspace change period ``T`` (authors' ``update_gap``).
      reset_state_on_refresh: zero the Adam state at every subspace change (authors'
        ``reset_statistics``); must be ``True`` for ``"block"``.
      b1, b2, eps: Adam hyperparameters (authors' default eps 1e-8).
      weight_decay: decoupled weight decay.
      labels: which leaves are matrices (default :func:`memjax.optim.label_matrices`).
      inner: replaces the subspace Adam (not with ``"block"``).
      weight_decay_mask: pytree or callable selecting the leaves that decay.
      seed: seed of the random subspaces / random block order.
      skip_nonfinite: skip steps with non-finite gradients.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: ``density`` outside ``(0, 1]``, or an unknown ``subspace``, ``order`` or
        ``state_free``, or an unsupported combination.

    Example:
      >>> import jax.numpy as jnp, memjax
      >>> params = {"w": jnp.ones((64, 32))}
      >>> tx = memjax.optim.frugal(1e-3, density=0.25)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> updates["w"].shape
      (64, 32)

    References:
      Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
      Scalable Training", arXiv 2411.07837 (2024).
    """
    _checks.check_fraction("density", density)
    _checks.check_choice("subspace", subspace, SUBSPACES)
    _checks.check_choice("order", order, block_adam.ORDERS)
    _checks.check_choice("state_free", state_free, block_adam.STATE_FREE)
    _checks.check_nonnegative("state_free_lr", state_free_lr)
    _checks.check_int("update_proj_gap", update_proj_gap, 1)
    if subspace == "block" and not reset_state_on_refresh:
        raise ValueError("reset_state_on_refresh=False is not supported with subspace='block' "
                         "(the moments belong to the previously active matrices).")
    if subspace == "block" and inner is not None:
        raise ValueError("inner= is not supported with subspace='block' (blocks use Adam).")
    adam = inner if inner is not None else optax.scale_by_adam(b1, b2, eps)
    policy = (residual_lib.drop(1.0) if state_free == "none"
              else residual_lib.state_free(state_free, state_free_lr))
    projector = {"svd": "svd", "random": proj_lib.orthogonal_projector,
                 "columns": proj_lib.coordinate_projector,
                 "rows": proj_lib.coordinate_projector}.get(subspace)
    proj_type = {"columns": "right", "rows": "left"}.get(subspace, "std")

    def build(tree):
        dims = _label_leaves(tree, labels)
        leaves, treedef = jax.tree.flatten(tree)
        names = []
        if subspace == "block":
            names = ["block" if d is not None else "full" for d in dims]
            transforms = {"full": adam, "block": block_adam.scale_by_block_adam(
                density, order, update_proj_gap, b1=b1, b2=b2, eps=eps, state_free=state_free,
                state_free_lr=state_free_lr, seed=seed)}
        else:
            for leaf, d in zip(leaves, dims):
                view = None if d is None else labels_lib.matrix_view(leaf.shape, d)
                rank = None if view is None else _frugal_rank(view, density, subspace)
                names.append("full" if rank is None else f"rank_{rank}")
            transforms = {"full": adam}
            for k, name in enumerate(sorted(set(names) - {"full"})):
                lab = treedef.unflatten([d if n == name else optax.MaskedNode()
                                         for d, n in zip(dims, names)])
                transforms[name] = scale_by_low_rank(
                    int(name.split("_")[1]), update_proj_gap, inner=adam, residual=policy,
                    proj_type=proj_type, projector=projector, labels=lab,
                    seed=seed + 1_000_003 * k, reset_inner_on_refresh=reset_state_on_refresh)
        transforms = {k: v for k, v in transforms.items() if k in names}
        return optax.partition(transforms, treedef.unflatten(names))

    def check(tree):
        labels_lib.warn_if_nothing_projected(tree, labels_lib.resolve_labels(tree, labels, 1),
                                             labels, 1, "frugal")

    return recipe.finish(_tree_dependent(build, check), learning_rate, weight_decay,
                         weight_decay_mask, skip_nonfinite, decay="before")
