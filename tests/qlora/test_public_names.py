"""qlora's public names: every `qlora.X` of the lazy table resolves, and every module that moved (qlora 0.1.0's flat
names, and the rooms of the house pass) still imports as the module it became, with a DeprecationWarning.

    .venv/bin/python -m pytest -q tests/qlora/test_public_names.py
"""
import importlib
import sys

import pytest

import qlora


@pytest.mark.parametrize("name", sorted(qlora._LAZY))
def test_every_public_name_resolves(name):
    assert getattr(qlora, name) is getattr(importlib.import_module(qlora._LAZY[name]), name)


@pytest.mark.parametrize("old, new", sorted(qlora._MOVED.items()))
def test_a_moved_module_imports_as_its_new_home_with_a_warning(old, new):
    sys.modules.pop(old, None)                     # imported before: the finder runs again
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
