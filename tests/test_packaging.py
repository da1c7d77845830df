"""The wheel a user installs: its top-level names cannot clash with a user's own folders.

``pip install memjax`` puts ``memjax`` (the library) and ``memjax_experiments`` (the folder
``experiments/`` of the repository, behind the ``memjax-train`` / ``memjax-memory`` console scripts)
into site-packages, nothing else: no ``experiments`` or ``benchmarks`` that would shadow a user's
own folders of those names.
"""

from __future__ import annotations

import configparser
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_IGNORE = shutil.ignore_patterns(".git", ".venv*", "runs", "build", "dist", "*.egg-info",
                                 "__pycache__", ".pytest_cache", ".hypothesis", "*.whl")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a copy of the repository (no network: the test extra's setuptools)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True)
    (path,) = (tmp / "dist").glob("memjax-*.whl")
    return zipfile.ZipFile(path)


def _sources(folder: str) -> set[str]:
    return {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*.py")}


def test_wheel_installs_only_memjax_and_memjax_experiments(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert top == {"memjax", "memjax_experiments", "memjax-0.1.0.dist-info"}, sorted(top)


def test_wheel_holds_every_source_file(wheel):
    names = set(wheel.namelist())
    for folder, installed in (("memjax", "memjax"), ("experiments", "memjax_experiments")):
        missing = {f for f in _sources(folder) if f"{installed}/{f}" not in names}
        assert not missing, f"{folder}/ files missing from the wheel (pyproject packages): {missing}"


def test_wheel_console_scripts(wheel):
    (entry,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry).decode())
    assert dict(parser["console_scripts"]) == {"memjax-train": "memjax_experiments.train:main",
                                               "memjax-memory": "memjax_experiments.memory:main"}


@pytest.mark.slow
def test_console_script_runs_outside_the_repository(tmp_path):
    """The installed ``memjax-train`` works from any folder, one holding its own ``experiments/``
    included (which ``python -m experiments.train`` would pick up)."""
    script = shutil.which("memjax-train", path=str(pathlib.Path(sys.executable).parent))
    assert script, "memjax-train is not installed next to this Python (pip install -e .)"
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "__init__.py").write_text("raise ImportError('the user folder')\n")
    done = subprocess.run([script, "--config", "smoke", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: memjax-train" in done.stdout
