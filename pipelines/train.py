"""Ray Train fine-tuning: split once on the driver, train on N workers, export the best model.

The driver discovers and splits the data (written as a manifest so a run is reproducible), then a
``TorchTrainer`` runs :func:`train_loop_per_worker` on every worker. N workers train the model
one would (``allcore.training.distributed``): the recipe's batch size and learning rate are the global
ones, BatchNorm is synchronised, and each epoch's metrics are summed over all workers. Each
epoch every worker reports them and rank 0 attaches a checkpoint; Ray keeps the best two by
validation macro-F1 plus the latest. A worker failure restarts the group from the latest checkpoint
(``FailureConfig``), and starting the same command again with the same ``--name`` resumes the
same way, because Ray Train restores the run's checkpoint list from ``storage_path/name``.

A lost node takes its workers with it. With a fixed group (``workers``) the restart needs as
many workers as before, so it needs a replacement node; with ``min_workers`` the group is
elastic (Ray Train's ``ScalingConfig(num_workers=(min, max))``): it restarts from the latest
checkpoint with the workers the surviving nodes hold, and grows back when nodes return. Either
size trains the same model, because the recipe's batch is the global one (``allcore.training.distributed``);
each history row records how many workers trained that epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from allcore.data import celldata
from allcore.training import distributed, engine
from allcore.imaging import files
from allcore.training import trust_fitting
from allcore.models.artifact import ModelCard, save_artifact
from allcore.data.samples import discover_samples
from allcore.data.labels import get_label_set
from allcore.models.registry import create_model, get_model_spec
from allcore.models.recipes import Recipe
from allcore.data.splits import SplitManifest, kfold_samples, split_samples
from allcore.training.build import (build_criterion, build_datasets, build_loaders, build_model,
                                    load_state, save_state, test_split_metrics)
from pipelines import ray_started_here, tracking

BEST_METRIC = "val_macro_f1"


@dataclass(frozen=True)
class TrainJob:
    """One training command: what to train on, where results go, how many workers."""

    recipe: Recipe
    data: str  # a class-folder tree, a manifest, or a laboratory's root (ALL-IDB, BCCD: cell crops)
    output: str  # local folder or s3:// prefix: Ray run storage, split manifest, artifacts
    name: str
    manifest: str | None = None  # CSV/Parquet of path,label[,group] instead of a folder tree
    split_manifest: str | None = None  # reuse an existing split instead of computing one
    workers: int = 1
    min_workers: int | None = None  # elastic: go on with as few as this many after a node loss
    use_gpu: bool = False
    max_failures: int = 2
    inject_failure_at_epoch: int | None = None  # tests only: fail once, to prove resumption
    verbose: bool = False  # Ray Train's own log lines (worker group, checkpoints) on the console
    # further laboratories' roots after ``data`` (``--data ROOT ROOT ...``): then every root is an
    # ALL-IDB, BCCD or Taleqani layout and the run trains a cell model on all their cell crops
    more_data: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # here, on the driver, rather than inside every Ray worker and its retries
        if self.min_workers is not None and not 1 <= self.min_workers <= self.workers:
            raise ValueError(f"--min-workers {self.min_workers} must be between 1 and --workers "
                             f"{self.workers}")
        for world_size in self.world_sizes():
            distributed.check_global_batch(self.recipe.batch_size, world_size)
        if self.more_data:
            if self.manifest:
                raise ValueError("--manifest reads one --data root; several --data roots are "
                                 "laboratories' roots whose cell crops training prepares itself")
            try:
                celldata.labs_of_roots(list(self.roots()))
            except ValueError as error:
                raise ValueError(f"several --data roots train a cell model on those "
                                 f"laboratories' cell crops: {error}") from None

    def roots(self) -> tuple[str, ...]:
        """Every ``--data`` root, ``data`` first."""
        return (self.data, *self.more_data)

    def world_sizes(self) -> range:
        """Every number of workers the run may train with (one, unless elastic)."""
        return range(self.workers if self.min_workers is None else self.min_workers,
                     self.workers + 1)

    def scaling_workers(self) -> int | tuple[int, int]:
        """``ScalingConfig.num_workers``: a fixed count, or Ray Train's elastic (min, max)."""
        return self.workers if self.min_workers is None else (self.min_workers, self.workers)


def run_training(job: TrainJob) -> list[str]:
    """Train every fold of ``job`` and return the exported artifact URIs."""
    recipe = job.recipe
    label_set = get_label_set(recipe.label_set)
    run_dir = files.join(job.output, job.name)
    if recipe.pretrained:
        # fail here, with the install hint, rather than inside every Ray worker and its retries
        create_model(recipe.model, num_classes=label_set.num_classes, pretrained=True,
                     input_size=recipe.input_size)
    cells = _prepare_cells(job, run_dir)
    if cells is not None:
        job = dataclasses.replace(job, data=cells.manifest, manifest=cells.manifest, more_data=())
    manifests = _split_manifests(job, label_set)
    artifacts = []
    tracking_uri = tracking.tracking_uri(job.output, job.name)  # one line when off, not one a fold
    for fold, manifest in enumerate(manifests):
        name = job.name if len(manifests) == 1 else f"{job.name}-fold{fold}"
        fold_dir = run_dir if len(manifests) == 1 else files.join(run_dir, f"fold{fold}")
        manifest_uri = files.join(fold_dir, "split_manifest.csv")
        if cells is not None:
            celldata.check_no_field_leaks(manifest, cells.manifest)
        if not files.exists(manifest_uri):
            manifest.write(manifest_uri)
        print(f"[allcore] {name}: split {manifest.counts()} -> {manifest_uri}", flush=True)
        tracked = tracking.start_run(tracking_uri, name, recipe, manifest.sha256) \
            if tracking_uri else None
        result = _fit(job, name, manifest_uri, tracked)
        artifact_uri = _export_best(job, result, manifest, fold_dir, name,
                                    cell_crop=cells.card_entry() if cells else {})
        _attach_trust(artifact_uri, manifest, name)
        if tracked:
            tracked.finish(artifact_uri)
        artifacts.append(artifact_uri)
    return artifacts


def _attach_trust(artifact_uri: str, manifest: SplitManifest, name: str) -> None:
    """Calibration, OOD detector and QC ranges into the card (allcore.trust.checks, on the driver)."""
    section = trust_fitting.attach_trust(artifact_uri, manifest)
    calibration, ood = section["calibration"], section["ood"]
    print(f"[allcore] {name}: temperature {section['temperature']:.2f} (val ECE "
          f"{calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f}); OOD {ood['method']} "
          f"threshold {ood['threshold']:.3g} flags {ood['val_flag_rate']:.1%} of val", flush=True)


# A single root of these laboratories is cut into cell crops; a single Taleqani root stays a
# field data set (its labels belong to fields: the field recipes train on it).
CELL_ROOT_LABS = (celldata.ALL_IDB, celldata.BCCD)


def _cell_roots(job: TrainJob) -> list[str] | None:
    """The roots whose cell crops the run trains on: every root when there are several (each a
    laboratory's layout, ``TrainJob`` checked), one ALL-IDB or BCCD root; None for field data."""
    if job.manifest:
        return None
    if job.more_data:
        return list(job.roots())
    return [job.data] if celldata.lab_of_root(job.data) in CELL_ROOT_LABS else None


def _prepare_cells(job: TrainJob, run_dir: str) -> celldata.CellCrops | None:
    """Data preparation step for laboratories' roots: cut cell crops once into the run's folder
    (``celldata.prepare_cell_crops``: each laboratory at its own archive's cell diameter)."""
    roots = _cell_roots(job)
    if roots is None:
        return None
    started = time.perf_counter()
    input_size = job.recipe.input_size or get_model_spec(job.recipe.model).weights.data_config.input_size
    geometry = celldata.CellCropGeometry(side_cell_diameters=job.recipe.cell_crop_side,
                                         input_size=input_size)
    cells = celldata.prepare_cell_crops(roots, files.join(run_dir, "cell_crops"), geometry=geometry)
    counts = "; ".join(f"{lab}: " + ", ".join(f"{n} {label}" for label, n in labels.items())
                       for lab, labels in celldata.crop_counts(cells.manifest).items())
    print(f"[allcore] cell crops ready in {time.perf_counter() - started:.0f}s ({counts}): "
          f"{cells.manifest}", flush=True)
    return cells


def _split_manifests(job: TrainJob, label_set) -> list[SplitManifest]:
    """The split(s) of this run; reused from storage on resume so a restart trains on the same data."""
    recipe = job.recipe
    if job.split_manifest:
        return [SplitManifest.read(job.split_manifest)]
    run_dir = files.join(job.output, job.name)
    existing = files.join(run_dir, "split_manifest.csv")
    if recipe.folds == 1 and files.exists(existing):
        return [SplitManifest.read(existing)]
    samples = discover_samples(job.data, label_set, manifest=job.manifest)
    started = time.perf_counter()
    if recipe.folds > 1:
        manifests = kfold_samples(samples, k=recipe.folds, seed=recipe.seed,
                                  strategy=recipe.split_strategy)
    else:
        manifests = [split_samples(samples, fractions=recipe.split, seed=recipe.seed,
                                   strategy=recipe.split_strategy)]
    print(f"[allcore] grouped {len(samples)} images into leakage-safe splits "
          f"({recipe.split_strategy}) in {time.perf_counter() - started:.1f}s", flush=True)
    return manifests


class InProcessTorchTrainer(ray.train.torch.TorchTrainer):
    """``TorchTrainer`` without Ray Train's placement-group cleaner, for a Ray this process
    started (``pipelines.init_ray``). The cleaner is a detached actor that asks the state API
    once a second whether the controller still lives, to free the workers' placement group if it
    died. An in-process Ray serves no state API (it has no dashboard), so the cleaner logged
    "Failed to query Ray Train Controller actor state" every second of training, and the
    placement group dies with this process anyway. (A private hook of the pinned Ray; a test
    fails if it moves.)"""

    def _create_default_callbacks(self) -> list:
        return [callback for callback in super()._create_default_callbacks()
                if not isinstance(callback, PlacementGroupCleanerCallback)]


def _fit(job: TrainJob, name: str, manifest_uri: str,
         tracked: tracking.TrackedRun | None) -> ray.train.Result:
    trainer_class = InProcessTorchTrainer if ray_started_here() else ray.train.torch.TorchTrainer
    trainer = trainer_class(
        train_loop_per_worker,
        train_loop_config={
            "recipe": job.recipe.to_dict(),
            "split_manifest": manifest_uri,
            "tracked": tracked,
            "inject_failure_at_epoch": job.inject_failure_at_epoch,
            "verbose": job.verbose,
            "failure_marker": files.join(files.join(job.output, job.name), f"{name}.injected_failure"),
        },
        scaling_config=ScalingConfig(num_workers=job.scaling_workers(), use_gpu=job.use_gpu,
                                     resources_per_worker={"CPU": _cpus_per_worker(job)}),
        run_config=RunConfig(
            name=name,
            **_ray_storage(job.output),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=BEST_METRIC, checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=job.max_failures),
            logging_config=LoggingConfig(log_level="INFO" if job.verbose else "WARNING"),
            # progress lines reach the driver once through log_to_driver, not twice
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    return trainer.fit()


def _cpus_per_worker(job: TrainJob) -> int:
    """CPU workers share the cluster's CPUs (Ray sets each worker's torch threads to its share;
    with the default of 1 a lone worker would leave the rest of the machine idle). GPU workers
    keep one CPU each for the loop; their data loaders use their own processes."""
    if job.use_gpu:
        return 1
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // job.workers)


def _ray_storage(output: str) -> dict:
    """Ray Train's ``storage_path`` (and filesystem) for ``output``. Checkpoints on s3:// go
    through the project's own S3 filesystem (``allcore.imaging.files``), configured from the environment
    like every other read and write of a job (``ALLCORE_S3_ENDPOINT_URL`` included), instead of
    Ray Train's default, pyarrow's S3 client: the rclone S3 server of the tests refused its
    uploads (INVALID_ACCESS_KEY_ID, even given the endpoint and keys explicitly)."""
    if output.startswith("s3://"):
        filesystem, path = files.filesystem(output)
        return {"storage_path": path,
                "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem))}
    return {"storage_path": output if "://" in output else str(Path(output).resolve() / "ray")}


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: plain PyTorch around ``allcore.training.engine``."""
    recipe = Recipe.from_dict(config["recipe"])
    label_set = get_label_set(recipe.label_set)
    if not config["verbose"]:
        # Ray Train's LoggingConfig level filters loggers named ray.train.*; its per-report line
        # comes from a logger named by its file's path, which only the root level stops
        logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(recipe.seed)

    model = build_model(recipe, label_set)
    data_config = model.data_config  # the recipe's input size was applied by create_model
    datasets = build_datasets(SplitManifest.read(config["split_manifest"]), recipe, label_set,
                              data_config)
    criterion = build_criterion(recipe, datasets["train"], label_set.num_classes, device)
    # the recipe's batch is the global one: each worker loads its share of every batch and of
    # the validation split (allcore.training.distributed), so Ray's DistributedSampler is not added
    train_loader, val_loader = (
        ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
        for loader in build_loaders(datasets, recipe, device, rank=rank, world_size=world))
    model.to(device)

    state = _restore(model)
    if world > 1:
        model = distributed.synchronize_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    lr = recipe.lr
    if state is not None:
        lr = state["lr"]
    elif recipe.lr_finder:
        found = engine.find_lr(model, criterion, train_loader, device, recipe)[0]
        lr = recipe.lr if found is None else found  # the same on every rank
        if rank == 0 and found is None:
            print(f"[allcore] LR finder: the loss did not fall at any rate it tried; training at "
                  f"the recipe's lr {recipe.lr:g}. Check the data and the weights (pretrained?), "
                  f"or set lr_finder=false and choose lr", flush=True)
        elif rank == 0:
            print(f"[allcore] LR finder suggests {lr:.3g}", flush=True)

    def report(row: dict, checkpoint: dict) -> None:
        _report(row, rank, {**checkpoint, "data_config": data_config.to_dict()})
        if rank == 0 and config["tracked"]:
            config["tracked"].log_epoch(row)

    engine.fit(model, criterion, train_loader, val_loader, device, recipe,
               num_classes=label_set.num_classes, lr=lr, resume=state,
               on_epoch_start=lambda epoch: _maybe_inject_failure(config, epoch),
               on_epoch_end=report, log=partial(print, flush=True) if rank == 0 else None)


def _restore(model: torch.nn.Module) -> dict | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_state(directory)
    model.load_state_dict(state["model"])
    return state


def _report(row: dict, rank: int, state: dict) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_state(directory, state)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _maybe_inject_failure(config: dict, epoch: int) -> None:
    """Tests prove resumption by failing once at a chosen epoch (a marker file makes it once)."""
    if config["inject_failure_at_epoch"] != epoch:
        return
    marker = config["failure_marker"]
    if files.exists(marker):
        return
    files.write_bytes(marker, b"failed once on purpose\n")
    raise RuntimeError(f"injected failure at epoch {epoch} (test hook)")


def _export_best(job: TrainJob, result: ray.train.Result, manifest: SplitManifest,
                 fold_dir: str, name: str, *, cell_crop: dict) -> str:
    """Evaluate the best checkpoint on the held-out test split and export it as an artifact.

    This is the one export step of a run (every fold passes here): whatever is fitted on the
    trained model before it ships (e.g. on the validation split) is computed here and stored
    in the ``ModelCard`` below."""
    best = result.get_best_checkpoint(BEST_METRIC, "max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"training run {name} produced no checkpoint; see the log above")
    recipe = job.recipe
    label_set = get_label_set(recipe.label_set)
    with best.as_directory() as directory:
        state = load_state(directory)
    with result.checkpoint.as_directory() as directory:
        history = load_state(directory)["history"]  # the whole run, not just up to the best epoch
    model = create_model(recipe.model, num_classes=label_set.num_classes, pretrained=False,
                         input_size=recipe.input_size, mask_corner=recipe.mask_corner)
    model.load_state_dict(state["model"])
    test_metrics = test_split_metrics(model, manifest, recipe, label_set)
    best_row = state["history"][-1]
    card = ModelCard(
        model_version=f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}",
        classes=list(label_set.classes), label_set=label_set.name, recipe=recipe.to_dict(),
        split_manifest_sha256=manifest.sha256, cell_crop=cell_crop,
        metrics={"best_epoch": best_row["epoch"],
                 "best_val": {k: best_row[k] for k in ("val_loss", "val_acc", "val_macro_f1")},
                 "test": test_metrics,
                 # how the recipe's (global) batch was shared; the metrics count every image
                 "distributed": {"workers": job.workers, "global_batch_size": recipe.batch_size,
                                 "worker_batch_size": recipe.batch_size // job.workers,
                                 "synchronized_batchnorm": job.workers > 1}},
    )
    artifact_uri = files.join(fold_dir, "model")
    save_artifact(artifact_uri, model, card)
    files.write_bytes(files.join(artifact_uri, "history.json"),
                   json.dumps(history, indent=2).encode())
    print(f"[allcore] {name}: best epoch {best_row['epoch']} val_macro_f1="
          f"{best_row[BEST_METRIC]:.3f}; test accuracy={test_metrics['accuracy']:.3f} "
          f"macro_f1={test_metrics['macro_f1']:.3f} (n={test_metrics['n']})", flush=True)
    print(f"[allcore] model artifact: {artifact_uri}", flush=True)
    return artifact_uri

