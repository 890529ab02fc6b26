"""Experiment tracking with MLflow (optional extra ``tracking``; off when MLflow is not installed).

One MLflow run per training run (per fold): the driver opens it with the recipe as parameters
and the split manifest's sha256 as a tag, rank 0 of the Ray Train worker group logs every epoch's
metrics into it, and the driver closes it with the exported artifact's location and weights
sha256. Ray's ``ray.air.integrations.mlflow.setup_mlflow`` is not used because it starts a new
MLflow run each time the worker group starts, so a run that recovers from a worker failure
(``FailureConfig``) or is resumed by name would be split over several MLflow runs; here the run
id travels in the train loop config and a restarted worker keeps logging into the same run.

Where: ``MLFLOW_TRACKING_URI`` (a tracking server) when set, else a local SQLite store in the
run's folder (``<output>/<name>/mlflow.db``: MLflow 3 retired the plain file store; browse it
with ``mlflow ui --backend-store-uri sqlite:///<output>/<name>/mlflow.db``).
With an ``s3://`` output and no tracking server, tracking is off (one line says so), and
``ALLCORE_TRACKING=0`` turns it off (the test suite does: creating a SQLite store costs seconds
per training run).
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

from allcore.models.artifact import read_card
from allcore.models.recipes import Recipe

EXPERIMENT = "allcore"


@dataclass(frozen=True)
class TrackedRun:
    """What a Ray Train worker needs to log into the driver's MLflow run (picklable)."""

    tracking_uri: str
    run_id: str

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    def log_epoch(self, row: dict) -> None:
        """Every numeric value of an epoch row, at step = epoch."""
        from mlflow.entities import Metric

        step, timestamp = int(row["epoch"]), int(time.time() * 1000)
        self._client().log_batch(self.run_id, metrics=[
            Metric(key, float(value), timestamp, step) for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)])

    def finish(self, artifact_uri: str) -> None:
        """Record where the exported model is and the sha256 of its weights; close the run."""
        client = self._client()
        client.set_tag(self.run_id, "allcore.artifact_uri", artifact_uri)
        client.set_tag(self.run_id, "allcore.artifact_weights_sha256", read_card(artifact_uri).sha256)
        client.set_terminated(self.run_id, "FINISHED")


def tracking_uri(output: str, run_dir_name: str) -> str | None:
    """The MLflow tracking URI for a run, or None when tracking is off (see the module doc)."""
    if os.environ.get("ALLCORE_TRACKING") == "0":
        return None
    if importlib.util.find_spec("mlflow") is None:
        return None
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    if "://" in output:
        print(f"[allcore] experiment tracking off: {output} is not a local folder and "
              f"MLFLOW_TRACKING_URI is not set", flush=True)
        return None
    store = Path(output, run_dir_name, "mlflow.db").resolve()
    store.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}"


def start_run(uri: str, name: str, recipe: Recipe, split_manifest_sha256: str) -> TrackedRun:
    """Open (or, for a resumed training run, reopen) the MLflow run named ``name``."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    existing = client.search_runs([experiment_id], f"tags.`allcore.run_name` = '{name}'",
                                  max_results=1)
    if existing:  # resumed by name: keep logging into the same run
        return TrackedRun(uri, existing[0].info.run_id)
    run = client.create_run(experiment_id, run_name=name, tags={
        "allcore.run_name": name, "allcore.split_manifest_sha256": split_manifest_sha256})
    client.log_batch(run.info.run_id, params=_params(recipe))
    print(f"[allcore] {name}: MLflow run {run.info.run_id} at {uri}", flush=True)
    return TrackedRun(uri, run.info.run_id)


def _params(recipe: Recipe) -> list:
    """The recipe, flattened (augment.hflip=...), as MLflow parameters."""
    from mlflow.entities import Param

    def flatten(prefix: str, value) -> list[tuple[str, object]]:
        if isinstance(value, dict):
            return [item for key, inner in value.items() for item in flatten(f"{prefix}{key}.", inner)]
        return [(prefix[:-1], value)]

    return [Param(key, str(value)) for key, value in flatten("", recipe.to_dict())]
