"""The README's own train / evaluate / score commands, run as a new user would: with relative
paths, from the repository root and from another directory (Ray Train once resolved a relative
``--output`` inside its session folder, so the README's training command failed on a fresh clone).

Shrunk to test size only where it must be: the demo recipe on a generated archive, 1 epoch, 32 px,
no pretrained weights, a small bootstrap."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from allcore.data.labels import get_label_set
from allcore.data.synthetic import write_archive

REPO = Path(__file__).resolve().parents[1]


def readme_command(job: str) -> list[str]:
    """The first ``.venv/bin/python jobs/<job>`` command of the README's code blocks."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if line.strip().startswith(f".venv/bin/python jobs/{job}"):
                return shlex.split(line)[1:]  # our interpreter instead of .venv/bin/python
    raise AssertionError(f"no '.venv/bin/python jobs/{job}' command in the README")


def without_options(argv: list[str], *names: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        else:
            out.append(arg)
    return out


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [a if not a.startswith("jobs/") else str(REPO / a) for a in argv]
    result = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(argv)} in {cwd}:\n{result.stderr[-3000:]}"
    return result


# what Ray, Ray Train and MLflow print of their own (kept off the console unless -v)
THIRD_PARTY_LOG_LINE = re.compile(r"(INFO|WARNING) \S+\.py:\d+ --|INFO mlflow|Reporting training "
                                  r"result|Checkpoint successfully created|training worker group")


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    """Only allcore's own lines on the console, and Ray Data 2.60's one line about its actors'
    constructor arguments (docs/SCORING.md, "Console output": raised by Ray Data itself)."""
    noisy = [line for line in (result.stdout + result.stderr).splitlines()
             if THIRD_PARTY_LOG_LINE.search(line)]
    assert not noisy, "\n".join(noisy[:10])


def test_readme_commands_work_with_relative_paths_from_any_directory(tmp_path):
    other = tmp_path / "elsewhere"
    write_archive(other / "demo_run" / "sample_archive", label_set=get_label_set("all4"),
                  per_class=6, size=48, seed=0)
    from_root = os.path.relpath(other, REPO)

    # training, from the repository root, with a relative --data and --output
    train = without_options(readme_command("train.py"), "--recipe", "--data", "--epochs",
                            "--input-size")
    assert "--output" not in train  # the README relies on the default, relative `runs`
    trained = run([*train, "--recipe", "demo", "--data", f"{from_root}/demo_run/sample_archive",
                   "--output", f"{from_root}/runs", "--epochs", "1", "--input-size", "32",
                   "--set", "pretrained=false"], cwd=REPO)
    assert (other / "runs" / "demo" / "model" / "model_card.json").exists()
    # in-process Ray serves no state API: Ray Train's placement-group cleaner, which asks it
    # every second, is left out (pipelines.train.InProcessTorchTrainer) instead of logging this
    assert "Failed to query Ray Train Controller" not in trained.stdout + trained.stderr
    assert_quiet(trained)
    assert "[allcore] epoch 1/1" in trained.stdout

    # evaluation and scoring as written (the README's s000 run is our demo run), from elsewhere
    evaluate = [a.replace("runs/s000/", "runs/demo/") for a in readme_command("evaluate.py")]
    run([*evaluate, "--bootstrap", "20", "--noise-sigmas", ""], cwd=other)
    assert (other / "runs" / "demo" / "evaluation" / "metrics.json").exists()
    # a 1-epoch model may send more than the default 10% of fields to review (exit 3): that gate
    # is tested in test_trust_scoring; here only the paths are, so the test sets the gate itself
    scored = run([*readme_command("score.py"), "--max-review-rate", "1.0"], cwd=other)
    assert_quiet(scored)
    assert list((other / "predictions" / "predictions").glob("scored_date=*/*.parquet"))
