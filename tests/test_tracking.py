"""Experiment tracking (pipelines/tracking.py): a tiny Ray Train run logs one MLflow run with
the recipe, every epoch's metrics, the split manifest's and the artifact's sha256."""

import pytest

from allcore.models.artifact import read_card
from allcore.data.labels import get_label_set
from allcore.models.recipes import load_recipe
from allcore.data.splits import SplitManifest
from allcore.data.synthetic import write_archive

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow", reason="experiment tracking is the optional extra "
                             "'tracking' (pip install 'allcore[tracking]')")


def test_tracking_is_off_when_asked_or_without_a_local_store(tmp_path, monkeypatch):
    from pipelines.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("ALLCORE_TRACKING", "0")
    assert tracking_uri(str(tmp_path), "run") is None
    monkeypatch.setenv("ALLCORE_TRACKING", "1")
    assert tracking_uri("s3://lab/runs", "run") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri("s3://lab/runs", "run") == "http://127.0.0.1:5000"


def test_training_run_is_tracked_in_a_local_mlflow_store(ray_session, tmp_path, monkeypatch):
    from pipelines.train import TrainJob, run_training

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("ALLCORE_TRACKING", "1")
    write_archive(tmp_path / "archive", label_set=get_label_set("all4"), per_class=6, size=48,
                  seed=5)
    recipe = load_recipe("demo").override(
        ["pretrained=false", "input_size=32", "epochs=2", "batch_size=8", "num_workers=0"])
    [uri] = run_training(TrainJob(recipe=recipe, data=str(tmp_path / "archive"),
                                  output=str(tmp_path / "runs"), name="tracked"))

    store = f"sqlite:///{tmp_path / 'runs' / 'tracked' / 'mlflow.db'}"
    [run] = mlflow.MlflowClient(store).search_runs(
        [mlflow.MlflowClient(store).get_experiment_by_name("allcore").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["model"] == recipe.model
    assert run.data.params["epochs"] == "2" and run.data.params["input_size"] == "32"
    manifest = SplitManifest.read(str(tmp_path / "runs" / "tracked" / "split_manifest.csv"))
    assert run.data.tags["allcore.split_manifest_sha256"] == manifest.sha256
    assert run.data.tags["allcore.artifact_uri"] == uri
    assert run.data.tags["allcore.artifact_weights_sha256"] == read_card(uri).sha256
    history = mlflow.MlflowClient(store).get_metric_history(run.info.run_id, "val_macro_f1")
    assert [m.step for m in history] == [0, 1]
