"""One table of faults and exit statuses (allcore.errors), kept by every job; an artifact is
checked file by file before Ray starts."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import allcore
from allcore import errors
from allcore.models.artifact import CARD_FILE, WEIGHTS_FILE, verified_card
from allcore.data.labels import get_label_set
from allcore.data.splits import split_samples
from allcore.data.synthetic import write_archive
from allcore.trust.checks import TRUST_FILE
from allcore.training.trust_fitting import attach_trust

REPO = Path(__file__).resolve().parents[1]


def readme_exit_table() -> dict[int, str]:
    """Status -> its row of the README's exit-code table."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Exit status", 1)[1].split("\n### ", 1)[0]
    return {int(match[1]): match[0] for match in re.finditer(r"^\| (\d+) \|.*$", section, re.M)}


def all_fault_classes() -> list[type]:
    for module in pkgutil.walk_packages(allcore.__path__, "allcore."):
        importlib.import_module(module.name)
    importlib.import_module("pipelines")
    found, todo = [], [errors.AllcoreError]
    while todo:
        found.extend(subclasses := todo.pop().__subclasses__())
        todo.extend(subclasses)
    return found


def test_every_fault_has_its_exit_status_in_the_readme_table():
    table = readme_exit_table()
    statuses = {value for name, value in vars(errors).items() if name.isupper() and isinstance(value, int)}
    assert statuses | set(errors.FOREIGN_EXIT_STATUS.values()) == set(table)  # one table, both ways
    faults = all_fault_classes()
    assert {"ArtifactIntegrityError", "ModelCardError", "WriterLockedError", "OutputUnwritableError",
            "RayClusterUnreachableError", "WeightsUnavailableError", "ImageDecodeError", "SlideError",
            "UploadError", "CorrectionError"} <= {cls.__name__ for cls in faults}
    readme = (REPO / "README.md").read_text()
    for cls in faults:
        if cls.exit_status is None:  # handled where raised: the README says where
            assert f"`{cls.__name__}`" in readme.split("### Exit status", 1)[1].split("\n### ", 1)[0]
        else:
            assert f"`{cls.__name__}`" in table[cls.exit_status], (cls, cls.exit_status)
    for kind, status in errors.FOREIGN_EXIT_STATUS.items():
        assert f"`{kind.__name__}`" in table[status]


def test_faults_keep_the_bases_their_callers_catch():
    from allcore.imaging.files import ImageDecodeError
    from allcore.imaging.slides import SlideError
    from pipelines import RayClusterUnreachableError

    assert issubclass(errors.ArtifactIntegrityError, RuntimeError)
    assert issubclass(errors.ModelCardError, ValueError)  # ModelCard.from_dict raised ValueError
    assert issubclass(ImageDecodeError, ValueError) and issubclass(SlideError, ValueError)
    assert RayClusterUnreachableError is errors.RayClusterUnreachableError
    # the score statuses the README documented before this table existed
    assert [errors.WriterLockedError.exit_status, errors.OutputUnwritableError.exit_status,
            errors.ArtifactIntegrityError.exit_status, errors.FOREIGN_EXIT_STATUS[FileNotFoundError],
            errors.RayClusterUnreachableError.exit_status] == [4, 5, 6, 7, 8]


def test_job_main_turns_a_known_fault_into_one_line_and_lets_a_bug_raise(capsys):
    @errors.job_main
    def main(exc: BaseException | None) -> int:
        if exc is not None:
            raise exc
        return errors.OK

    assert main(None) == 0
    assert main(errors.OutputUnwritableError("cannot write to /x: disk full")) == 5
    assert capsys.readouterr().err == "OutputUnwritableError: cannot write to /x: disk full\n"
    assert main(FileNotFoundError("no /x")) == 7
    for bug in (KeyError("x"), errors.AllcoreError("no status: handled where raised")):
        with pytest.raises(type(bug)):
            main(bug)


@pytest.fixture(scope="module")
def trusted_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """``tiny_artifact`` with a trust section and its ``trust.safetensors``."""
    root = tmp_path_factory.mktemp("trusted")
    shutil.copytree(tiny_artifact, root / "model")
    samples = write_archive(root / "fit", label_set=get_label_set("all4"), per_class=4, size=64,
                            near_duplicates=False)
    attach_trust(str(root / "model"), split_samples(samples, fractions=(0.5, 0.5, 0.0),
                                                    names=("train", "val", "test")))
    return root / "model"


def tampered(artifact: Path, into: Path, how: str) -> Path:
    """A copy of ``artifact`` with one of its files damaged ``how``."""
    shutil.copytree(artifact, into)
    card_path = into / CARD_FILE
    card = json.loads(card_path.read_text())
    if how == "trust bytes":  # the case
        data = bytearray((into / TRUST_FILE).read_bytes())
        data[-1] ^= 0xFF
        (into / TRUST_FILE).write_bytes(bytes(data))
    elif how == "trust not a detector, card re-hashed":  # sha256 matches, content does not
        (into / TRUST_FILE).write_bytes(b"not a detector")
        card["trust"]["ood"]["sha256"] = hashlib.sha256(b"not a detector").hexdigest()
        card_path.write_text(json.dumps(card))
    elif how == "trust method edited":
        card["trust"]["ood"]["method"] = "no-such-method"
        card_path.write_text(json.dumps(card))
    elif how == "trust missing":
        (into / TRUST_FILE).unlink()
    elif how == "weights missing":
        (into / WEIGHTS_FILE).unlink()
    elif how == "card cut off":
        card_path.write_text(card_path.read_text()[:40])
    else:
        raise AssertionError(how)
    return into


TAMPERINGS = ["trust bytes", "trust not a detector, card re-hashed", "trust method edited",
              "trust missing", "weights missing", "card cut off"]


@pytest.mark.parametrize("how", TAMPERINGS)
def test_verified_card_refuses_every_damaged_file(trusted_artifact, tmp_path, how):
    bad = tampered(trusted_artifact, tmp_path / "bad", how)
    with pytest.raises(errors.ArtifactIntegrityError):
        verified_card(str(bad))
    verified_card(str(trusted_artifact))  # the untouched artifact passes


def run_score_job(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``jobs/score.py`` on a small generated archive with its own RAY_TMPDIR (returned, to
    check that no Ray session was started in it)."""
    write_archive(tmp_path / "in", label_set=get_label_set("all4"), per_class=1, size=48)
    ray_tmp = tmp_path / "raytmp"
    ray_tmp.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "score.py"), *args,
                           "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    return done, ray_tmp


@pytest.mark.parametrize("how", ["trust bytes", "trust not a detector, card re-hashed"])
def test_score_job_stops_on_a_tampered_trust_file_before_ray_starts(trusted_artifact, tmp_path, how):
    """Exit 6, one line on stderr, no traceback, no Ray session and no output written (the
    second case reached Ray and ended in a 30-line SafetensorError traceback, exit 1)."""
    bad = tampered(trusted_artifact, tmp_path / "bad", how)
    done, ray_tmp = run_score_job(tmp_path, "--model", str(bad))
    assert done.returncode == 6, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("ArtifactIntegrityError: ") and "Re-export the model" in line
    assert "Traceback" not in done.stderr
    assert not list(ray_tmp.rglob("session_*")), "Ray was started"
    assert not (tmp_path / "out").exists()  # before the lock and the listing


def test_score_job_refuses_a_field_model_as_cell_model_before_ray_starts(tiny_artifact, tmp_path):
    """A field model given as --cell-model: exit 10 and one line (it was a ValueError
    traceback, exit 1)."""
    done, ray_tmp = run_score_job(tmp_path, "--model", str(tiny_artifact), "--per-cell",
                                  "--cell-model", str(tiny_artifact))
    assert done.returncode == errors.WRONG_MODEL_KIND == 10, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("ModelKindError: ") and "not a cell model" in line
    assert not list(ray_tmp.rglob("session_*")), "Ray was started"


def test_evaluate_job_checks_the_artifact_before_evaluating(trusted_artifact, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_job_errors", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    bad = tampered(trusted_artifact, tmp_path / "bad", "trust not a detector, card re-hashed")
    status = job.main(["--model", str(bad), "--data", "/nonexistent-never-read",
                       "--output", str(tmp_path / "evaluation")])
    assert status == 6
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ArtifactIntegrityError: ") and "OOD detector" in line
    assert not (tmp_path / "evaluation").exists()
