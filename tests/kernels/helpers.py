"""Shared helpers for the kernel tests."""

import math

import jax


def max_intermediate_size(fn, *args) -> int:
    """Largest array (in elements) produced by any equation of fn's jaxpr, sub-jaxprs included."""

    def walk(jaxpr) -> int:
        largest = 0
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                largest = max(largest, math.prod(getattr(var.aval, "shape", ())))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    if hasattr(sub, "eqns"):
                        largest = max(largest, walk(sub))
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        largest = max(largest, walk(sub.jaxpr))
        return largest

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)
