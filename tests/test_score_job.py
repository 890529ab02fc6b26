"""End-to-end scoring on Ray Data: table contents, incremental reruns, bad inputs, crashes, S3."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from allcore.models.artifact import load_artifact
from allcore.imaging.files import decode_rgb
from allcore.data.labels import get_label_set
from allcore.scoring.config import ScoringConfig
from allcore.scoring.inference_path import inference_path
from allcore.scoring.rows import SCHEMA_METADATA_KEY
from allcore.data.synthetic import write_archive
from allcore.imaging.transforms import eval_transform

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SQL = (REPO / "sql" / "bi_queries.sql").read_text()


def run_scoring(config: ScoringConfig, **kw):
    from pipelines.score import run_scoring as run  # imports Ray only for these tests
    return run(config, **kw)


def archive(root: Path, per_class: int = 4) -> list[str]:
    samples = write_archive(root, label_set=get_label_set("all4"), per_class=per_class, size=64)
    return [s.path for s in samples]


def bi_queries(output: str) -> tuple[duckdb.DuckDBPyConnection, list]:
    """Run every statement of sql/bi_queries.sql; return the connection and each result."""
    con = duckdb.connect()
    results = [con.execute(statement).to_arrow_table()
               for statement in con.extract_statements(SQL.replace("${OUTPUT}", output))]
    return con, results


def rows(con: duckdb.DuckDBPyConnection, view: str = "committed_predictions") -> list[dict]:
    return con.execute(f"SELECT * FROM {view} ORDER BY source_uri, scored_at").to_arrow_table() \
        .to_pylist()


def test_scores_an_archive_and_reruns_add_nothing(tmp_path, ray_session, tiny_artifact):
    paths = archive(tmp_path / "in")
    out = str(tmp_path / "out")
    config = ScoringConfig(model=tiny_artifact, input=str(tmp_path / "in"), output=out,
                           batch_size=4, actors=(1, 1), commit_every=7)
    first = run_scoring(config)
    assert (first.listed, first.ok, first.errors, first.skipped) == (16, 16, 0, 0)
    assert not first.failed
    # the default path of the tiny MobileNetV2, and why, in the run summary
    recorded = json.loads(Path(out, "_runs", first.run_id, "summary.json").read_text())
    expected = inference_path("mobilenet_v2")
    assert recorded["inference"]["model"] == {"path": expected.name, "reason": expected.reason}
    records = sorted((json.loads(p.read_text()) for p in Path(out, "_commits").glob("*.json")),
                     key=lambda r: r["chunk"])
    assert [r["files"][0]["rows"] for r in records] == [7, 7, 2]  # commit_every rows a chunk

    con, results = bi_queries(out)
    assert all(r is not None for r in results)
    table = rows(con)
    assert sorted(r["source_uri"] for r in table) == sorted(paths)
    assert {r["status"] for r in table} == {"ok"} and {r["run_id"] for r in table} == {first.run_id}
    model, card = load_artifact(tiny_artifact)
    transform = eval_transform(card.data_config_obj())
    with torch.no_grad():
        direct = torch.softmax(model(torch.stack(
            [transform(decode_rgb(Path(r["source_uri"]).read_bytes())) for r in table])), 1).numpy()
    probs = np.array([[r[f"prob_{c}"] for c in card.classes] for r in table])
    np.testing.assert_allclose(probs, direct, atol=1e-4)
    assert [r["pred_label"] for r in table] == [card.classes[i] for i in direct.argmax(1)]
    assert {r["specimen_id"] for r in table} == set(card.classes)  # default: parent folder
    assert all((r["box_x1"], r["box_y1"]) == (64, 64) for r in table)
    part = next(Path(out, "predictions").rglob("*.parquet"))
    assert json.loads(pq.read_schema(part).metadata[SCHEMA_METADATA_KEY])["model"]["classes"] \
        == card.classes
    assert ScoringConfig.from_json(
        Path(out, "_runs", first.run_id, "config.json").read_text()) == config

    again = run_scoring(config)
    assert (again.listed, again.ok, again.skipped, again.chunks) == (16, 0, 16, 0)
    assert len(rows(bi_queries(out)[0])) == 16

    full = run_scoring(ScoringConfig(**{**config.__dict__, "full": True}))
    assert (full.ok, full.skipped) == (16, 0)
    con, _ = bi_queries(out)
    assert len(rows(con)) == 32
    latest = rows(con, "latest_predictions")
    assert len(latest) == 16 and {r["run_id"] for r in latest} == {full.run_id}
    assert all(Path(out, "_runs", r.run_id, "_SUCCESS").exists() for r in (first, again, full))


def load_job():
    spec = importlib.util.spec_from_file_location("score_job", REPO / "jobs" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_makes_paths_absolute_and_rejects_bad_values(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    job = load_job()
    config = job.parse_args(["--model", "m", "--input", "s3://lab/in", "--output", "out",
                             "--actors", "2,6", "--full"])
    assert (config.model, config.input, config.output) == (str(tmp_path / "m"), "s3://lab/in",
                                                           str(tmp_path / "out"))
    assert config.actors == (2, 6) and config.full
    for bad in (["--actors", "two"], ["--actors", "4,2"], ["--specimen-pattern", "(a)(b)"]):
        with pytest.raises(SystemExit):
            job.parse_args(["--model", "m", "--input", "i", "--output", "o", *bad])
    assert "capture group" in capsys.readouterr().err


def test_bad_inputs_become_one_error_row_each_and_fail_the_run(tmp_path, ray_session,
                                                               tiny_artifact, bad_images, capsys):
    good = archive(tmp_path / "good", per_class=2)
    convertible, bad = bad_images(tmp_path / "bad")
    manifest = tmp_path / "nightly.txt"
    manifest.write_text("\n".join(good + convertible + list(bad)) + "\n")
    out = str(tmp_path / "out")
    exit_code = load_job().main(["--model", tiny_artifact, "--input", str(tmp_path),
                                 "--manifest", str(manifest), "--output", out,
                                 "--batch-size", "8", "--actors", "1,1"])
    assert exit_code == 2  # 10+ bad files out of ~24 is far above the 5% default
    assert "FAILED: error rate" in capsys.readouterr().err

    con, _ = bi_queries(out)
    table = rows(con)
    errors = {r["source_uri"]: r["error"] for r in table if r["status"] == "error"}
    assert set(errors) == set(bad) and len(bad) >= 10
    assert all(fragment in errors[path] for path, fragment in bad.items())
    assert Counter(r["source_uri"] for r in table) == Counter(good + convertible + list(bad))
    manifest_json = json.loads(next(Path(out, "_runs").glob("*/summary.json")).read_text())
    assert manifest_json["balanced"] and manifest_json["errors"] == len(bad)
    assert manifest_json["ok"] == len(good) + len(convertible)
    assert not list(Path(out, "_runs").glob("*/_SUCCESS"))


def test_a_crashed_run_resumes_without_rescoring_committed_chunks(tmp_path, ray_session,
                                                                  tiny_artifact):
    paths = archive(tmp_path / "in")
    config = ScoringConfig(model=tiny_artifact, input=str(tmp_path / "in"),
                           output=str(tmp_path / "out"), batch_size=4, actors=(1, 1),
                           commit_every=6)

    def crash(record: dict) -> None:
        raise KeyboardInterrupt(f"simulated kill after chunk {record['chunk']}")

    with pytest.raises(KeyboardInterrupt):
        run_scoring(config, on_commit=crash)
    resumed = run_scoring(config)
    assert (resumed.listed, resumed.skipped, resumed.ok) == (16, 6, 10)
    table = rows(bi_queries(config.output)[0])
    assert Counter(r["source_uri"] for r in table) == Counter(paths)  # each input exactly once
    assert len({r["run_id"] for r in table}) == 2


def test_scores_from_s3_to_s3_as_a_separate_process(tmp_path, tiny_artifact, s3_server,
                                                    monkeypatch):
    """`python jobs/score.py` in its own process (its own Ray), credentials from env only."""
    import s3fs

    paths = archive(tmp_path / "in", per_class=2)
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(key=s3_server["AWS_ACCESS_KEY_ID"],
                           secret=s3_server["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": s3_server["AWS_ENDPOINT_URL"]})
    fs.put(str(tmp_path / "in"), "lab/smears", recursive=True, batch_size=1)  # serving_s3
    env = {**os.environ, **s3_server, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, str(REPO / "jobs" / "score.py"), "--model", tiny_artifact,
               "--input", "s3://lab/smears", "--output", "s3://lab/out", "--actors", "1,1",
               "--batch-size", "4"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 inputs = 8 ok + 0 errors + 0 skipped (balanced)" in done.stdout

    fs.invalidate_cache()
    files = fs.glob("lab/out/predictions/**/*.parquet")
    table = pq.ParquetDataset(files, filesystem=fs).read()
    expected = {"s3://lab/smears/" + str(Path(p).relative_to(tmp_path / "in")) for p in paths}
    assert sorted(table["source_uri"].to_pylist()) == sorted(expected)
    assert set(table["status"].to_pylist()) == {"ok"}
    assert all(table["source_mtime"].to_pylist())  # the ETag: the change detector on S3


def test_a_head_left_behind_in_the_address_file_fails_at_once_saying_so(tmp_path, tiny_artifact):
    """A head killed without `ray stop` leaves ray_current_cluster; ray.init would wait on it
    for minutes. Scoring and training exit 8 (allcore.errors), each naming the file."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    ray_tmp = tmp_path / "raytmp"
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead_port}")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    archive(tmp_path / "in", per_class=1)
    commands = [
        [str(REPO / "jobs" / "score.py"), "--model", tiny_artifact, "--input",
         str(tmp_path / "in"), "--output", str(tmp_path / "out")],
        [str(REPO / "jobs" / "train.py"), "--recipe", "demo", "--data", str(tmp_path / "in"),
         "--output", str(tmp_path / "runs")],
    ]
    for command in commands:
        done = subprocess.run([sys.executable, *command], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 8, done.stderr[-3000:]
        assert "no Ray cluster answers at" in done.stderr and "ray_current_cluster" in done.stderr
        assert "Traceback" not in done.stderr
