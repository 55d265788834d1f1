"""The public surface: what lylm exports, and that importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import lylm
import lylm.balancers
import lylm.openai
import lylm.server
import lylm.testing


def test_all_is_sorted_and_every_name_exists() -> None:
    for module in (lylm, lylm.balancers, lylm.testing, lylm.openai, lylm.server):
        assert module.__all__ == sorted(module.__all__), module
        for name in module.__all__:
            assert hasattr(module, name), (module, name)


def test_public_names_live_in_private_modules_and_are_documented() -> None:
    for name in lylm.__all__:
        obj = getattr(lylm, name)
        if isinstance(obj, type):
            module = obj.__module__
            assert module.startswith("lylm.") and module.rsplit(".", 1)[1].startswith("_"), name
            assert obj.__doc__ and obj.__doc__.strip(), name


def test_import_lylm_does_not_import_heavy_packages() -> None:
    code = (
        "import sys, lylm, lylm.balancers, lylm.testing\n"
        "heavy = [m for m in ('vllm', 'torch', 'starlette', 'transformers', 'tokenizers')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
