"""The examples in memjax.optim's docstrings run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import memjax.optim

MODULES = sorted(m.name for m in pkgutil.iter_modules(memjax.optim.__path__))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"memjax.optim.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
