"""`pip install .` as a container image would do it: a wheel built from the checkout and installed
away from it has the jobs as commands and finds the recipes by name (package data), with no
checkout on ``sys.path``. Offline: no build isolation (setuptools from this environment), no
index, no dependencies installed (this environment's torch, Ray, ... serve the installed copy)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "allcore", "pipelines", "jobs")  # what the build reads
COMMANDS = {"allcore-train": "jobs.train:main", "allcore-evaluate": "jobs.evaluate:main",
            "allcore-score": "jobs.score:main", "allcore-demo": "jobs.demo:main",
            "allcore-review": "jobs.review:main", "allcore-render-cells": "jobs.render_cells:main"}

# run in the installed copy: every package, the distribution's metadata and the recipes come from
# the target folder, and each command's entry point is the job's main
CHECK_INSTALLED = """
import importlib.metadata, json
from pathlib import Path

import allcore, jobs, jobs.train, pipelines
from allcore.models.recipes import RECIPE_DIR, list_recipes, load_recipe

dist = importlib.metadata.distribution("allcore")
commands = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
print(json.dumps({
    "files": [str(Path(m.__file__).resolve()) for m in (allcore, jobs, pipelines)],
    "metadata": str(Path(dist.locate_file("allcore")).resolve()),
    "recipe_dir": str(Path(str(RECIPE_DIR)).resolve()),
    "recipes": list_recipes(),
    "demo_model": load_recipe("demo").model,
    "commands": {name: ep.value for name, ep in commands.items()},
    "train_main_is_the_job": commands["allcore-train"].load() is jobs.train.main,
}))
"""


def run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command[:4]}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_a_wheel_installed_elsewhere_runs_the_commands_and_finds_the_recipes(tmp_path):
    pytest.importorskip("setuptools", reason="--no-build-isolation builds with this setuptools")
    source = tmp_path / "source"  # a copy: build/ and *.egg-info stay out of the checkout
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(source)], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("allcore-*.whl")
    target = tmp_path / "site"
    run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        cwd=tmp_path)
    assert not (target / "benchmarks").exists() and not (target / "tests").exists()

    # from an empty folder with only the target in front of this environment's site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    checked = run([sys.executable, "-c", CHECK_INSTALLED], elsewhere, env)
    found = json.loads(checked.stdout)
    assert all(Path(f).is_relative_to(target.resolve()) for f in found["files"]), found["files"]
    assert Path(found["metadata"]).is_relative_to(target.resolve())
    assert Path(found["recipe_dir"]) == target.resolve() / "allcore" / "configs" / "recipes"
    assert {"demo", "cell_blast", "s000_mobilenet_v2_all4"} <= set(found["recipes"])
    assert found["demo_model"] == "mobilenet_v2"
    assert found["commands"] == COMMANDS and found["train_main_is_the_job"]

    # the generated command itself: its --help lists the recipes it found in the installed copy
    helped = run([str(target / "bin" / "allcore-train"), "--help"], elsewhere, env)
    assert helped.stdout.startswith("usage: allcore-train")
    assert "s000_mobilenet_v2_all4" in helped.stdout and "--recipe" in helped.stdout
