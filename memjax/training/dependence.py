"""Which inputs each output of a traced function depends on (for the layerwise step's check).

A forward pass over the jaxpr of ``fn``: every value carries the set of argument leaves it was
computed from. Calls (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat``), ``cond``,
``while`` and ``scan`` are entered (loops to a fixed point); any other primitive with a sub-jaxpr
makes each of its outputs depend on all of its inputs, so the answer is an over-approximation:
a dependence it misses cannot exist, one it reports may not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core

_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
          "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin")


def _open(jaxpr: Any) -> Any:
    return jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") and hasattr(jaxpr, "consts") else jaxpr


def _union(sets) -> frozenset:
    out = frozenset()
    for s in sets:
        out |= s
    return out


def _jaxpr_deps(jaxpr: Any, ins: Sequence[frozenset]) -> list[frozenset]:
    env: dict = {}

    def read(a):
        return frozenset() if isinstance(a, core.Literal) else env.get(a, frozenset())

    for v, d in zip(jaxpr.invars, ins):
        env[v] = d
    for eqn in jaxpr.eqns:
        for v, d in zip(eqn.outvars, _eqn_deps(eqn, [read(a) for a in eqn.invars])):
            env[v] = d
    return [read(v) for v in jaxpr.outvars]


def _sub_jaxpr(params: dict) -> Any:
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if params.get(name) is not None:
            return _open(params[name])
    return None


def _eqn_deps(eqn: Any, ins: list[frozenset]) -> list[frozenset]:
    name, p, n_out = eqn.primitive.name, eqn.params, len(eqn.outvars)
    if name in _CALLS:
        sub = _sub_jaxpr(p)
        if sub is not None and len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
            return _jaxpr_deps(sub, ins)
    elif name == "cond":
        outs = [frozenset()] * n_out
        for branch in p["branches"]:
            outs = [a | b for a, b in zip(outs, _jaxpr_deps(_open(branch), ins[1:]))]
        return [o | ins[0] for o in outs]
    elif name == "while":
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, carry = ins[:nc], ins[nc:nc + nb], list(ins[nc + nb:])
        while True:
            pred = _union(_jaxpr_deps(_open(p["cond_jaxpr"]), cconsts + carry))
            body = _jaxpr_deps(_open(p["body_jaxpr"]), bconsts + carry)
            new = [a | b | pred for a, b in zip(carry, body)]
            if new == carry:
                return carry
            carry = new
    elif name == "scan":
        nc, nk = p["num_consts"], p["num_carry"]
        consts, carry, xs = ins[:nc], list(ins[nc:nc + nk]), ins[nc + nk:]
        while True:
            outs = _jaxpr_deps(_open(p["jaxpr"]), consts + carry + xs)
            new = [a | b for a, b in zip(carry, outs[:nk])]
            if new == carry:
                return carry + outs[nk:]
            carry = new
    return [_union(ins)] * n_out


def output_dependence(fn: Callable, num_tracked: int, *args: Any) -> list[frozenset]:
    """For each output leaf of ``fn(*args)``, the indices (among the first ``num_tracked`` leaves
    of ``args``, flattened) that it may depend on. ``args`` may be ``jax.ShapeDtypeStruct`` s;
    nothing is computed."""
    closed = jax.make_jaxpr(fn)(*args)
    n_in = len(closed.jaxpr.invars)
    ins = [frozenset([i]) if i < num_tracked else frozenset() for i in range(n_in)]
    return _jaxpr_deps(closed.jaxpr, ins)
