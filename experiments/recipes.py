"""One config class per optimizer recipe, each with its own fields and its authors' defaults.

``OptimizerConfig(name="galore", rank=8)`` builds the recipe's class (here :class:`GaLoreConfig`),
so configs read as before; a field the recipe does not have is a ``TypeError`` naming it. The
command line shows each optimizer slot with its recipe's fields only (``--optimizers.1.rank``);
``--optimizers.N.name RECIPE`` replaces slot N (or, for N = the number of optimizers, appends one)
with that recipe at its defaults (:func:`experiments.train.parse`).

Adding a recipe means one class here (registered in :data:`RECIPE_CLASSES`) and one builder in
``experiments.optimizers.RECIPES``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

OptimizerName = Literal["adamw", "galore", "fira", "apollo", "apollo_mini", "frugal", "q_galore",
                        "mezo"]
ProjectorName = Literal["svd", "dct", "random", "power"]
SubspaceName = Literal["svd", "random", "columns", "rows", "block"]
BlockOrder = Literal["random", "ascending", "descending", "mirror"]
StateFreeRule = Literal["sign", "sgd", "none"]
ScaleType = Literal["channel", "tensor"]
ProjBits = Literal[4, 8]
AdamBits = Literal[32, 8]
WeightBits = Literal[32, 8]
WeightRounding = Literal["stochastic", "nearest"]
ProjType = Literal["std", "reverse_std", "left", "right", "min_state"]
RefreshMode = Literal["synchronous", "staggered"]

RECIPE_CLASSES: dict[str, type] = {}
"""Recipe name -> its config class."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optimizer, chosen by name; ``OptimizerConfig(name=..., **fields)`` builds that recipe's
    class (:data:`RECIPE_CLASSES`)."""

    name: OptimizerName = "adamw"
    """Recipe: adamw, galore, fira, apollo, apollo_mini, frugal, q_galore or mezo."""
    label: str = ""
    """Display name and run sub-directory; default: the name, plus the projector for galore, fira
    and apollo (galore-svd) and the subspace for frugal (frugal-block)."""
    learning_rate: float = 2e-3
    """Peak learning rate of the warmup + cosine schedule."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is OptimizerConfig:
            name = kwargs.get("name", args[0] if args else "adamw")
            if name not in RECIPE_CLASSES:
                raise ValueError(f"unknown optimizer name {name!r}; available: "
                                 f"{', '.join(RECIPE_CLASSES)}")
            cls = RECIPE_CLASSES[name]
        return object.__new__(cls)

    def __post_init__(self) -> None:
        own = _recipe_name(type(self))
        if own is not None and self.name != own:
            raise ValueError(f"{type(self).__name__} is the {own!r} recipe, not name={self.name!r}; "
                             f"build OptimizerConfig(name={self.name!r}, ...) instead")

    @property
    def display_name(self) -> str:
        if self.label:
            return self.label
        name = self.name
        if self.name in ("galore", "fira", "apollo"):
            name = f"{self.name}-{self.projector}"
        elif self.name == "frugal":
            name = f"frugal-{self.subspace}"
        elif self.name == "mezo" and self.zo_shared_seed:
            name = "mezo-shared-seed"
        name = f"{name}-8bit" if getattr(self, "adam_bits", 32) == 8 else name
        if getattr(self, "weight_bits", 32) == 8:
            name = f"{name}-int8" + ("-nearest" if self.weight_rounding == "nearest" else "")
        return f"{name}-layerwise" if getattr(self, "layerwise", False) else name


def _recipe_name(cls: type) -> str | None:
    return next((name for name, c in RECIPE_CLASSES.items() if c is cls), None)


def recipe(name: str):
    """Registers a config class as recipe ``name``."""
    def register(cls: type) -> type:
        RECIPE_CLASSES[name] = cls
        return cls
    return register


def optimizer_fields(name: str) -> tuple[str, ...]:
    """The fields of recipe ``name``'s config class."""
    return tuple(f.name for f in dataclasses.fields(RECIPE_CLASSES[name]))


@dataclasses.dataclass(frozen=True)
class GradientConfig(OptimizerConfig):
    """Fields of every gradient recipe (all but mezo)."""

    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-6
    """Adam epsilon (1e-6 as in the GaLore authors' code)."""
    layerwise: bool = False
    """Update each layer inside the backward pass (memjax.training.layerwise_step): no gradient
    tree is held, so the step needs about one layer's gradient instead of all of them. Clipping
    (schedule.clip_norm) is exact (a norm-only backward pass first, which also skips a step with
    a non-finite gradient); gradient accumulation is supported."""
    weight_bits: WeightBits = 32
    """Bits of the blocks' linear weights; 8 keeps them as INT8 codes with a scale per group of
    weight_group_size (memjax.optim.QuantizedWeight; Q-GaLore, Q-APOLLO), each update applied by
    dequantising, adding and re-quantising with weight_rounding. Embedding, head and norms stay
    float."""
    weight_group_size: int = 256
    """weight_bits 8: entries per scale (Q-GaLore 256, Q-APOLLO-Mini 128)."""
    weight_rounding: WeightRounding = "stochastic"
    """weight_bits 8: stochastic rounding (unbiased; the authors') or nearest (for comparison)."""


@dataclasses.dataclass(frozen=True)
class _Adam8bitFields(GradientConfig):
    adam_bits: AdamBits = 32
    """Bits of the Adam moments; 8 stores them as blockwise 8-bit codes
    (memjax.optim.scale_by_adam_8bit), as in the GaLore paper's 8-bit rows."""
    block_size: int = 256
    """adam_bits 8: block size of the 8-bit moments."""
    min_8bit_size: int = 4096
    """adam_bits 8: state leaves with fewer entries keep float32 moments."""


@dataclasses.dataclass(frozen=True)
class _ProjectedFields(_Adam8bitFields):
    update_proj_gap: int = 50
    """Projector refresh period T (steps)."""
    proj_type: ProjType = "std"
    """Which side is projected."""
    refresh: RefreshMode = "synchronous"
    """Refresh every matrix at once or staggered across steps."""


@recipe("adamw")
@dataclasses.dataclass(frozen=True)
class AdamWConfig(_Adam8bitFields):
    """AdamW (optax.adamw; blockwise 8-bit moments with adam_bits 8)."""

    name: Literal["adamw"] = "adamw"
    """Recipe (--optimizers.N.name another one replaces this slot)."""


@recipe("galore")
@dataclasses.dataclass(frozen=True)
class GaLoreConfig(_ProjectedFields):
    """GaLore (Zhao et al. 2024): Adam on rank-r projections of each matrix's gradient."""

    name: Literal["galore"] = "galore"
    """Recipe (--optimizers.N.name another one replaces this slot)."""
    rank: int = 16
    """Projection rank r."""
    scale: float = 0.25
    """Scale (alpha) of the back-projected update."""
    projector: ProjectorName = "svd"
    """svd (GaLore), dct (SVD-free), random (seed-only state) or power (warm-started block power
    iteration)."""
    reset_inner_on_refresh: bool = False
    """Zero each projected matrix's Adam moments at its refresh (the 2025 pre-training
    benchmark's "momentum reset"; the authors keep them)."""


@recipe("fira")
@dataclasses.dataclass(frozen=True)
class FiraConfig(_ProjectedFields):
    """Fira (Chen et al. 2024): GaLore plus the scaled full-rank residual."""

    name: Literal["fira"] = "fira"
    """Recipe (--optimizers.N.name another one replaces this slot)."""
    rank: int = 16
    """Projection rank r."""
    scale: float = 0.25
    """Scale (alpha) of the update."""
    projector: ProjectorName = "svd"
    """svd, dct, random or power."""
    gamma: float = 1.01
    """Norm-growth limiter threshold (an update's norm grows at most by this factor per step)."""
    paper_form: bool = False
    """Residual G - up(R) (paper) instead of G - scale * up(R) (authors' code)."""


@dataclasses.dataclass(frozen=True)
class _ApolloFields(_ProjectedFields):
    projector: ProjectorName = "random"
    """random (authors), svd, dct or power."""
    gamma: float = 1.01
    """Norm-growth limiter threshold."""
    scale_front: bool = False
    """Multiply by sqrt(scale) before the limiter instead of after."""
    limiter: bool = True
    """Apply the norm-growth limiter (authors: disable_nl=False)."""


@recipe("apollo")
@dataclasses.dataclass(frozen=True)
class ApolloConfig(_ApolloFields):
    """APOLLO (Zhu et al. 2025): channel-wise learning-rate scaling from a rank-r random sketch."""

    name: Literal["apollo"] = "apollo"
    """Recipe (--optimizers.N.name another one replaces this slot)."""
    rank: int = 16
    """Projection rank r."""
    scale: float = 1.0
    """Scale of the update (multiplied by sqrt(scale))."""
    scale_type: ScaleType = "channel"
    """Channel- or tensor-wise scaling factors."""


@recipe("apollo_mini")
@dataclasses.dataclass(frozen=True)
class ApolloMiniConfig(_ApolloFields):
    """APOLLO-Mini: rank 1, one tensor-wise scaling factor."""

    name: Literal["apollo_mini"] = "apollo_mini"
    """Recipe (--optimizers.N.name another one replaces this slot)."""
    scale: float = 128.0
    """Scale of the update (multiplied by sqrt(scale))."""
    scale_type: ScaleType = "tensor"
    """Channel- or tensor-wise scaling factors."""


@recipe("frugal")
@dataclasses.dataclass(frozen=True)
class FrugalConfig(GradientConfig):
    """FRUGAL (Zmushko et al. 2025): Adam on a state-full subspace, signSGD outside it."""

    name: Literal["frugal"] = "frugal"
    """Recipe (--optimizers.N.name another one replaces this slot)."""
    update_proj_gap: int = 50
    """Subspace (active block) refresh period T (steps)."""
    density: float = 0.25
    """State-full fraction of each matrix (of the matrices, for subspace block), in (0, 1]."""
    subspace: SubspaceName = "svd"
    """svd, random (orthonormal), columns, rows, or block (whole stacked matrices, BAdam-like)."""
    order: BlockOrder = "descending"
    """block: order in which the matrices become active (authors' block_order)."""
    state_free: StateFreeRule = "sign"
    """Optimizer outside the subspace: sign (signSGD), sgd, or none (GaLore-like)."""
    state_free_lr: float = 1.0
    """State-free learning rate as a multiple of the schedule (authors' inactive_lr_scale)."""
    reset_state_on_refresh: bool = True
    """Zero the Adam state at every subspace change (authors' reset_statistics; required for
    block)."""


@recipe("q_galore")
@dataclasses.dataclass(frozen=True)
class QGaLoreConfig(GradientConfig):
    """Q-GaLore (Zhang et al. 2024): INT4 projectors, 8-bit Adam, lazy layer-adaptive refresh."""

    name: Literal["q_galore"] = "q_galore"
    """Recipe (--optimizers.N.name another one replaces this slot)."""
    rank: int = 16
    """Projection rank r."""
    update_proj_gap: int = 50
    """Projector refresh period T (steps)."""
    scale: float = 0.25
    """Scale (alpha) of the back-projected update."""
    proj_type: ProjType = "std"
    """Which side is projected."""
    refresh: RefreshMode = "synchronous"
    """Refresh every matrix at once or staggered across steps."""
    proj_bits: ProjBits = 4
    """Bits of the quantized projector."""
    proj_group_size: int = 256
    """Quantization group size of the projector."""
    queue_size: int = 5
    """Cosine similarities averaged by the lazy refresh."""
    cos_threshold: float = 0.4
    """Mean cosine similarity from which a layer's refresh gap grows."""
    gamma_proj: int = 2
    """Factor by which a stable layer's refresh gap grows."""
    lazy: bool = True
    """Layer-adaptive lazy refresh (off: refresh every update_proj_gap steps)."""
    block_size: int = 256
    """Block size of the 8-bit Adam moments."""
    min_8bit_size: int = 4096
    """State leaves with fewer entries keep float32 moments."""


@recipe("mezo")
@dataclasses.dataclass(frozen=True)
class MezoConfig(OptimizerConfig):
    """MeZO (Malladi et al. 2023): zeroth-order SGD, forward passes only."""

    name: Literal["mezo"] = "mezo"
    """Recipe (--optimizers.N.name another one replaces this slot)."""
    zo_eps: float = 1e-3
    """SPSA perturbation scale eps (MeZO: 1e-3)."""
    zo_samples: int = 1
    """SPSA samples n per step (n-SPSA); each costs two forward passes."""
    zo_shared_seed: bool = False
    """The shared-seed variant over the mesh's data axis (each worker perturbs with its own key on
    its own shard and all-gathers one int8 code per sample; parameters are replicated, so
    mesh.fsdp must be 1). The replay log (step key, codes, lr per step) is saved next to the
    checkpoints as replay_log.npz: initial parameters + log = the current parameters."""
