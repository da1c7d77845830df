"""Lets a kernel subpackage be called as its main function.

``memjax.kernels.selective_scan`` is both the subpackage (``.ops``, ``.reference``, ``.xla``) and,
when called, the function ``memjax.kernels.selective_scan.selective_scan``. Replacing the
subpackage attribute by the function would break ``import memjax.kernels.selective_scan.ops``.
"""

import functools
import sys
import types


def make_module_callable(module_name: str, fn) -> None:
    """Makes ``sys.modules[module_name](...)`` call ``fn(...)``."""

    class _CallableModule(types.ModuleType):
        @functools.wraps(fn)
        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
