"""A real two-node Ray cluster on loopback (tests/ray_cluster.py): training and scoring jobs
submitted with `ray job submit`, run across both nodes on shared storage (S3), and a node lost
in the middle of each. Training goes on from its last checkpoint on the surviving node (an
elastic group, ``--min-workers 1``); scoring's actor on the lost node is restarted on the node
that replaces it, and every input still ends as exactly one row."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from allcore.data.labels import get_label_set
from allcore.data.synthetic import write_archive
from ray_cluster import LocalRayCluster
from conftest import serving_s3

pytestmark = pytest.mark.slow  # ~4 minutes on 2 cores
# a node found dead within ~3 s of its last heartbeat, not Ray's default ~30 s (read by the GCS)
QUICK_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def wait_until(condition, what: str, cluster: LocalRayCluster, job: str, seconds: float = 180,
               every: float = 0.2):
    """``condition()`` once it is true; past ``seconds`` fail with the job's log."""
    deadline = time.time() + seconds
    while not (found := condition()):
        if time.time() > deadline:
            log = cluster.ray("job", "logs", job).stdout
            pytest.fail(f"gave up after {seconds:.0f} s waiting for {what}; job {job}:\n{log[-5000:]}")
        time.sleep(every)
    return found


def committed_inputs(bucket: Path, table: str) -> int:
    """Field rows committed so far, from the commit records the scoring driver writes."""
    return sum(f["rows"] for record in (bucket / table / "_commits").glob("*.json")
               for f in json.loads(record.read_text())["files"])


def test_two_nodes_train_and_score_and_survive_losing_a_node(tmp_path):
    s3_root = tmp_path / "s3"
    (s3_root / "lab").mkdir(parents=True)
    train_data = tmp_path / "train"
    write_archive(train_data, label_set=get_label_set("all4"), per_class=8, size=64, seed=5)
    fields = write_archive(s3_root / "lab" / "smears", label_set=get_label_set("all4"),
                           per_class=32, size=64, seed=6)  # the archive, served on S3
    with serving_s3(s3_root) as s3_env, LocalRayCluster(tmp_path / "logs", s3_env) as cluster:
        cluster.start_head(num_cpus=1, env=QUICK_NODE_DEATH)
        cluster.add_node("worker-a", num_cpus=1)

        # training: one worker a node, checkpoints on S3; the worker node dies after the first
        train = cluster.submit("train", [
            "jobs/train.py", "--recipe", "demo", "--workers", "2", "--min-workers", "1",
            "--data", str(train_data), "--output", "s3://lab/runs", "--name", "two-nodes",
            "--epochs", "8", "--input-size", "32", "--set", "pretrained=false"], wait=False)
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        run_dir = s3_root / "lab" / "runs" / "two-nodes"
        wait_until(lambda: (run_dir / "checkpoint_manager_snapshot.json").exists(),
                   "the first checkpoint on S3", cluster, "train")
        cluster.kill_node("worker-a")
        log = cluster.wait_for_job("train")
        assert cluster.job_status("train") == "SUCCEEDED", log[-5000:]
        history = json.loads((run_dir / "model" / "history.json").read_text())
        assert [row["epoch"] for row in history] == list(range(8))
        assert history[0]["workers"] == 2 and history[-1]["workers"] == 1, history
        assert history[-1]["resumed_at_epoch"] > 0  # from a checkpoint, not from scratch
        assert (run_dir / "model" / "model.safetensors").exists()

        # scoring: two 1-CPU actors on two 1-CPU nodes, so one on each (the run cannot start
        # otherwise); the worker node dies after the first commit
        cluster.add_node("worker-b", num_cpus=1)
        score = cluster.submit("score", [
            "jobs/score.py", "--model", "s3://lab/runs/two-nodes/model",
            "--input", "s3://lab/smears", "--output", "s3://lab/out", "--actors", "2,2",
            "--batch-size", "2", "--commit-every", "4", "--max-review-rate", "1"], wait=False)
        assert score.returncode == 0, score.stdout[-3000:] + score.stderr[-3000:]
        wait_until(lambda: committed_inputs(s3_root / "lab", "out") > 0, "the first commit",
                   cluster, "score")
        committed_before_the_loss = committed_inputs(s3_root / "lab", "out")
        cluster.kill_node("worker-b")  # the head may finish the rest while it notices the loss
        assert committed_before_the_loss < 128, "scoring ended before the node loss"
        cluster.add_node("worker-c", num_cpus=1)  # what an autoscaler does: replace the node
        log = cluster.wait_for_job("score")
        assert cluster.job_status("score") == "SUCCEEDED", log[-5000:]
        assert "128 inputs = 128 ok + 0 errors + 0 skipped (balanced)" in log, log[-3000:]
    rows = pq.ParquetDataset(str(s3_root / "lab" / "out" / "predictions")).read(
        columns=["source_uri", "row_kind"]).to_pylist()
    expected = {f"s3://{Path(field.path).relative_to(s3_root)}" for field in fields}
    assert Counter(r["source_uri"] for r in rows if r["row_kind"] == "field") \
        == Counter({uri: 1 for uri in expected})
