"""What real archives and schedulers do to a nightly run: symlink loops, names that are not UTF-8,
two runs started at once, an output that cannot be written, a tampered model. Each ends as error
rows (the run goes on) or as one line and a documented exit status (the run stops early)."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest

from allcore.imaging.files import BAD_NAME, TOO_LARGE, UNREADABLE, iter_image_files
from allcore.scoring.config import ScoringConfig
from allcore.scoring.inputs import iter_input_list
from allcore.errors import WriterLockedError
from allcore.scoring.store import OutputStore
from allcore.data.labels import get_label_set
from allcore.data.splits import split_samples
from allcore.data.synthetic import write_archive
from allcore.trust.checks import TRUST_FILE
from allcore.training.trust_fitting import attach_trust

REPO = Path(__file__).resolve().parents[1]


def small_archive(root: Path) -> list[str]:
    samples = write_archive(root, label_set=get_label_set("all4"), per_class=1, seed=0, size=48)
    return sorted(str(Path(s.path)) for s in samples)


def load_score_job():
    spec = importlib.util.spec_from_file_location("score_job_faults", REPO / "jobs" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_loop_and_bad_name(root: Path) -> tuple[Path, Path]:
    """A symlink loop (``loop/up -> ..``) and a file whose name is not UTF-8 under ``root``."""
    folder = next(p for p in sorted(root.iterdir()) if p.is_dir())
    (folder / "loop").mkdir()
    os.symlink("..", folder / "loop" / "up")
    some = next(folder.glob("*.*"))
    bad = os.path.join(os.fsencode(folder), b"bad\xff\xfename.png")
    shutil.copy(os.fsencode(some), bad)
    return folder, Path(os.fsdecode(bad))


def test_listing_cuts_symlink_loops_and_reports_bad_names(tmp_path):
    paths = small_archive(tmp_path / "in")
    with_loop_and_bad_name(tmp_path / "in")
    listed = list(iter_image_files(str(tmp_path / "in")))
    good = [f.uri for f in listed if not f.listing_error]
    assert sorted(good) == paths  # each real file once, the loop not followed again
    [bad] = [f for f in listed if f.listing_error]
    assert bad.error_kind == BAD_NAME and bad.uri.endswith("bad\\xff\\xfename.png")
    assert bad.uri.encode("utf-8")  # storable as text; the raw bytes are recoverable
    assert "rename" in bad.listing_error


def test_an_unlistable_folder_is_an_entry_not_an_exception(tmp_path, monkeypatch):
    small_archive(tmp_path / "in")
    real_scandir = os.scandir

    def refuse_one(path):
        if str(path).endswith("/in/" + sorted(os.listdir(tmp_path / "in"))[0]):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_one)
    errors = [f for f in iter_image_files(str(tmp_path / "in")) if f.listing_error]
    assert len(errors) == 1 and "unlistable folder" in errors[0].listing_error


def test_input_list_paths_are_normalised(tmp_path):
    paths = small_archive(tmp_path / "in")
    first = Path(paths[0])
    listing = tmp_path / "list.txt"
    spelled = f"{first.parent.name}/../{first.parent.name}//{first.name}"
    listing.write_text(f"{first.relative_to(tmp_path / 'in')}\n{spelled}\n")
    assert {f.uri for f in iter_input_list(str(listing), str(tmp_path / "in"))} == {str(first)}


def _take_lock(root: str, run_id: str, start, results, finish) -> None:
    start.wait()
    try:
        OutputStore(root).acquire_writer(run_id)
        results.put(run_id)
    except WriterLockedError:
        results.put(None)
    finish.wait(30)  # stay alive: a holder that has exited is stale, and taking over is right


def test_two_runs_started_at_the_same_instant_get_one_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    for trial in range(5):
        root = str(tmp_path / f"out{trial}")
        start, finish, results = context.Event(), context.Event(), context.Queue()
        runs = [context.Process(target=_take_lock, args=(root, f"run{i}", start, results, finish))
                for i in range(2)]
        for run in runs:
            run.start()
        start.set()
        taken = [results.get(timeout=30) for _ in runs]
        finish.set()
        for run in runs:
            run.join(10)
        assert sum(t is not None for t in taken) == 1, taken


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.acquire_writer("first")
    with pytest.raises(WriterLockedError, match="first"):
        OutputStore(store.root).acquire_writer("second")  # this process is alive
    lock = tmp_path / "out" / "_runs" / "_writer.lock"
    lock.write_text(lock.read_text().replace(f'"pid": {os.getpid()}', '"pid": 999999999'))
    OutputStore(store.root).acquire_writer("third")  # holder gone: taken over
    assert '"third"' in lock.read_text()


def test_faults_end_with_one_line_and_their_exit_status(tmp_path, tiny_artifact, capsys):
    job = load_score_job()
    small_archive(tmp_path / "in")
    base = ["--model", tiny_artifact, "--input", str(tmp_path / "in")]

    (tmp_path / "a_file").write_text("not a folder")
    assert job.main([*base, "--output", str(tmp_path / "a_file")]) == 5
    assert "a file is in the way" in capsys.readouterr().err

    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    out = "/sys/allcore-output" if os.geteuid() == 0 else str(read_only / "out")  # root ignores modes
    assert job.main([*base, "--output", out]) == 5
    assert "permission denied" in capsys.readouterr().err

    OutputStore(str(tmp_path / "locked")).acquire_writer("holder")
    assert job.main([*base, "--output", str(tmp_path / "locked")]) == 4
    assert "holder" in capsys.readouterr().err

    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_artifact, tampered)
    weights = tampered / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert job.main(["--model", str(tampered), "--input", "/nonexistent-listing-never-reached",
                     "--output", str(tmp_path / "never")]) == 6
    err = capsys.readouterr().err
    assert "ArtifactIntegrityError" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()  # checked before the lock, the listing and Ray

    # the trust section's detector file is checked as early, and ends the same way
    with_trust = tmp_path / "with-trust"
    shutil.copytree(tiny_artifact, with_trust)
    samples = write_archive(tmp_path / "fit", label_set=get_label_set("all4"), per_class=4, size=64,
                            near_duplicates=False)
    attach_trust(str(with_trust), split_samples(samples, fractions=(0.5, 0.5, 0.0),
                                                names=("train", "val", "test")))
    (with_trust / TRUST_FILE).write_bytes(b"not the detector")
    assert job.main(["--model", str(with_trust), "--input", "/nonexistent-listing-never-reached",
                     "--output", str(tmp_path / "never")]) == 6
    err = capsys.readouterr().err
    assert TRUST_FILE in err and "ArtifactIntegrityError" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


def field_rows(output: Path) -> list[tuple]:
    import duckdb

    table = str(output / "predictions" / "**" / "*.parquet")
    return duckdb.sql(f"SELECT source_uri, status, error_kind FROM read_parquet('{table}') "
                      "WHERE row_kind = 'field'").fetchall()


def test_fault_matrix_every_listed_input_is_one_field_row(tmp_path, ray_session, tiny_artifact):
    """A symlink loop, a name that is not UTF-8, an image over --max-pixels and two runs started
    at the same instant: one run is refused, the other gives every listed input exactly one field
    row; permanent errors are not retried by the next run."""
    from PIL import Image

    from pipelines.score import run_scoring

    paths = small_archive(tmp_path / "in")
    folder, _ = with_loop_and_bad_name(tmp_path / "in")
    Image.new("RGB", (300, 300)).save(folder / "big.png")
    config = ScoringConfig(model=tiny_artifact, input=str(tmp_path / "in"),
                           output=str(tmp_path / "out"), max_pixels=200 * 200,
                           max_error_rate=1.0, commit_every=4)
    start, outcomes = threading.Barrier(2), []

    def run() -> None:
        start.wait()
        try:
            outcomes.append(run_scoring(config))
        except WriterLockedError as exc:
            outcomes.append(exc)

    runs = [threading.Thread(target=run) for _ in range(2)]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join(300)
    [summary] = [o for o in outcomes if not isinstance(o, Exception)]
    assert sum(isinstance(o, WriterLockedError) for o in outcomes) == 1

    listed = len(paths) + 2  # + big.png + the bad name; the loop adds nothing
    assert summary.listed == listed and summary.ok + summary.errors == listed and summary.balanced
    rows = field_rows(tmp_path / "out")
    assert len(rows) == listed and len({r[0] for r in rows}) == listed
    assert Counter(r[2] for r in rows if r[1] == "error") == Counter({BAD_NAME: 1, TOO_LARGE: 1})
    assert run_scoring(config).to_score == 0  # permanent errors stay until the file changes


def test_transient_errors_are_retried_without_full(tmp_path, ray_session, tiny_artifact):
    """An input listed but unreadable (here: named in the input list, not there yet) is retried
    by the next run; a path spelled twice in the list is scored once."""
    from pipelines.score import run_scoring

    paths = small_archive(tmp_path / "in")
    first = Path(paths[0]).relative_to(tmp_path / "in")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{first}\n{first.parent}/../{first}\nlate/arrival.jpg\n")
    config = ScoringConfig(model=tiny_artifact, input=str(tmp_path / "in"), input_list=str(listing),
                           output=str(tmp_path / "out"), max_error_rate=1.0)
    summary = run_scoring(config)
    assert (summary.listed, summary.skipped, summary.ok, summary.errors) == (3, 1, 1, 1)
    assert sorted(r[2] or "" for r in field_rows(tmp_path / "out")) == ["", UNREADABLE]
    retried = run_scoring(config)
    assert (retried.to_score, retried.errors) == (1, 1)  # tried again, still missing
