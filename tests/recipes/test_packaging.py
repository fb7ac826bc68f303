"""The recipes ship with the package: a non-editable `pip install .` into a temp folder, run from
elsewhere, still finds them (`qlora train --help`, `qlora train sft`, `recipes/configs/sft.yaml`).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/recipes/test_packaging.py -m slow

Slow (~1 min: it builds the wheel). The installed copy is imported from the temp folder, with the
venv's torch & co. underneath (`--no-deps`, `--no-build-isolation`: offline).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_non_editable_install_finds_its_recipes(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(REPO)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    assert (target / "qlora_recipes" / "configs" / "sft.yaml").is_file()
    assert not (target / "recipes").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def qlora(*args):
        return subprocess.run([sys.executable, "-m", "qlora.cli", *args], capture_output=True, text=True,
                              cwd=elsewhere, env=env)
    where = subprocess.run([sys.executable, "-c", "import qlora, qlora.cli as c; print(qlora.__file__); "
                            "print(c.recipes_dir())"], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert where.stdout.splitlines() == [str(target / "qlora" / "__init__.py"), str(target / "qlora_recipes")]
    helped = qlora("train", "--help")
    assert helped.returncode == 0 and "sft" in helped.stdout and "seq_cls" in helped.stdout
    # the recipe module and its packaged YAML load; the bad value is reported as for a checkout
    for spelling in ("sft", "recipes/configs/sft.yaml"):
        bad = qlora("train", spelling, "mode=head")
        assert bad.returncode == 2 and "mode='head'; allowed: qlora, lora, full" in bad.stderr, bad.stderr
