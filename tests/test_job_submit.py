"""`ray job submit` against a `ray start --head` on loopback, with Ray 2.60 token auth, as the
README writes it: the job names the project's interpreter and trains on two workers."""

import pytest

from allcore.models.artifact import load_artifact
from allcore.data.labels import get_label_set
from allcore.data.synthetic import write_archive
from ray_cluster import LocalRayCluster

pytestmark = pytest.mark.slow


def test_train_job_through_ray_job_submit(tmp_path):
    archive = tmp_path / "archive"
    write_archive(archive, label_set=get_label_set("all4"), per_class=8, size=64, seed=5)
    out = tmp_path / "runs"
    # no virtualenv on PATH: the README's command names its interpreter (a bare `python` would be
    # whatever the head's PATH finds first)
    with LocalRayCluster(tmp_path / "logs") as cluster:
        cluster.start_head(num_cpus=2)
        submit = cluster.submit("submitted", [
            "jobs/train.py", "--recipe", "demo", "--workers", "2", "--data", str(archive),
            "--output", str(out), "--name", "submitted", "--epochs", "1", "--input-size", "32",
            "--set", "pretrained=false"])
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout
    _, card = load_artifact(str(out / "submitted" / "model"))
    assert card.classes == list(get_label_set("all4").classes)
