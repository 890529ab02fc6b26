"""Ray Train end to end on a generated archive: export, failure recovery, resume by name; a cell
model on two laboratories' roots."""

import json

import pytest

from allcore.data import celldata
from allcore.models.artifact import load_artifact
from allcore.data.labels import get_label_set
from allcore.models.recipes import load_recipe
from allcore.data.splits import SplitManifest
from allcore.data.synthetic import write_archive
from cell_trees import write_all_idb, write_bccd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    write_archive(root, label_set=get_label_set("all4"), per_class=10, size=64, seed=3)
    return str(root)


def _job(archive, output, name, **kw):
    from pipelines.train import TrainJob

    recipe = load_recipe("demo").override(
        ["pretrained=false", "input_size=32", "epochs=3", "batch_size=8", "num_workers=0"])
    return TrainJob(recipe=recipe, data=archive, output=str(output), name=name, **kw)


def _history(output, name):
    return json.loads((output / name / "model" / "history.json").read_text())


def test_worker_failure_resumes_from_last_checkpoint_and_exports(ray_session, archive, tmp_path):
    from pipelines.train import run_training

    [uri] = run_training(_job(archive, tmp_path, "crash", inject_failure_at_epoch=1, max_failures=1))
    assert (tmp_path / "crash" / "crash.injected_failure").exists(), "the failure really happened"
    history = _history(tmp_path, "crash")
    assert [row["epoch"] for row in history] == [0, 1, 2]
    # epoch 0 ran before the failure; the restarted worker group began at epoch 1, not 0
    assert [row["resumed_at_epoch"] for row in history] == [0, 1, 1]

    model, card = load_artifact(uri)
    manifest = SplitManifest.read(str(tmp_path / "crash" / "split_manifest.csv"))
    assert card.split_manifest_sha256 == manifest.sha256
    assert card.classes == ["Benign", "Early", "Pre", "Pro"]
    assert card.data_config["input_size"] == 32
    assert card.metrics["test"]["n"] == len(manifest.subset("test"))
    from allcore.trust.checks import load_trust  # fitted on the driver after export, hash-checked here
    assert load_trust(uri, card.trust).temperature > 0


def test_interrupted_run_resumes_when_started_again_with_the_same_name(ray_session, archive, tmp_path):
    from pipelines.train import run_training

    with pytest.raises(Exception, match="injected failure"):
        run_training(_job(archive, tmp_path, "again", inject_failure_at_epoch=2, max_failures=0))
    run_training(_job(archive, tmp_path, "again"))
    assert [row["resumed_at_epoch"] for row in _history(tmp_path, "again")] == [0, 0, 2]


def test_two_workers_share_every_batch_and_report_the_whole_split(ray_session, archive, tmp_path):
    """The Ray wiring of allcore.training.distributed (tests/test_distributed.py has the equivalence): the
    recipe's batch of 8 is shared by two workers, so an epoch takes as many steps as one worker's
    and its metrics count the whole training and validation split."""
    from pipelines.train import run_training

    [uri] = run_training(_job(archive, tmp_path, "two", workers=2))
    manifest = SplitManifest.read(str(tmp_path / "two" / "split_manifest.csv"))
    train, val = len(manifest.subset("train")), len(manifest.subset("val"))
    assert {(row["train_steps"], row["train_images"], row["val_images"])
            for row in _history(tmp_path, "two")} == {(train // 8, train // 8 * 8, val)}
    _, card = load_artifact(uri)
    assert card.metrics["distributed"] == {"workers": 2, "global_batch_size": 8,
                                           "worker_batch_size": 4, "synchronized_batchnorm": True}


def test_a_batch_that_does_not_split_over_the_workers_fails_before_ray_starts(archive, tmp_path):
    with pytest.raises(ValueError, match="multiple of --workers"):
        _job(archive, tmp_path, "odd", workers=3)


def test_an_elastic_group_needs_a_batch_that_splits_over_every_size_it_may_shrink_to(archive,
                                                                                    tmp_path):
    """--workers 4 --min-workers 2 may train with 2, 3 or 4 workers: 3 does not split 8."""
    assert _job(archive, tmp_path, "elastic", workers=2, min_workers=1).scaling_workers() == (1, 2)
    with pytest.raises(ValueError, match="over 3 workers"):
        _job(archive, tmp_path, "elastic", workers=4, min_workers=2)
    with pytest.raises(ValueError, match="between 1 and --workers"):
        _job(archive, tmp_path, "elastic", workers=2, min_workers=3)


@pytest.fixture(scope="module")
def binary_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("binary")
    write_archive(root, label_set=get_label_set("all4"), per_class=12, size=48, seed=4)
    return str(root)


@pytest.mark.parametrize("name", ["s001_efficientnet_b3_onecycle", "s002_vgg16_cnn",
                                  "s003_mobilenet_binary", "s004_mobilenet_m"])
def test_published_recipe_runs_end_to_end(ray_session, binary_archive, tmp_path, name):
    """Every recipe's machinery (LR finder + one-cycle, frozen body, class weights, desaturation
    oversampling, L1 head, plateau + early stopping, k-fold) runs through Ray Train and exports."""
    from pipelines.train import TrainJob, run_training

    recipe = load_recipe(name).override(
        ["pretrained=false", "input_size=32", "epochs=2", "batch_size=8", "num_workers=0",
         "folds=" + str(min(2, load_recipe(name).folds))])
    uris = run_training(TrainJob(recipe=recipe, data=binary_archive, output=str(tmp_path), name=name))
    assert len(uris) == recipe.folds
    for uri in uris:
        model, card = load_artifact(uri)
        assert card.recipe["name"] == name and card.model_name == recipe.model
        assert len(card.classes) == get_label_set(recipe.label_set).num_classes
    if recipe.folds > 1:
        tests = [set(s.path for s in SplitManifest.read(str(tmp_path / name / f"fold{k}" / "split_manifest.csv")).subset("test"))
                 for k in range(recipe.folds)]
        assert not tests[0] & tests[1], "k-fold test folds are disjoint"


@pytest.fixture(scope="module")
def two_labs(tmp_path_factory):
    """Synthetic ALL-IDB and BCCD roots (BCCD: three groups of image numbers)."""
    root = tmp_path_factory.mktemp("labs")
    write_all_idb(root / "all-idb")
    write_bccd(root / "bccd", numbers=(0, 1, 10, 11, 20, 21))
    return root


def test_a_cell_model_trains_on_two_laboratories(ray_session, two_labs, tmp_path):
    """``--data ALL-IDB BCCD``: one crop set over both (each laboratory at its own diameter),
    one split over it, and a card that names both with their source diameters."""
    from pipelines.train import TrainJob, run_training

    recipe = load_recipe("cell_blast").override(
        ["pretrained=false", "input_size=32", "epochs=1", "batch_size=8", "num_workers=0"])
    [uri] = run_training(TrainJob(recipe=recipe, data=str(two_labs / "all-idb"),
                                  more_data=(str(two_labs / "bccd"),), output=str(tmp_path),
                                  name="cells"))
    _, card = load_artifact(uri)
    assert card.cell_crop["source"] == f"{celldata.ALL_IDB}+{celldata.BCCD}"
    diameters = card.cell_crop["source_cell_diameter_px"]
    assert diameters[celldata.ALL_IDB] == celldata.ALL_IDB_CELL_DIAMETER_PX and diameters[celldata.BCCD] > 0
    assert celldata.CellCropGeometry.from_card(card) == celldata.CellCropGeometry(2.0, 32)
    crops = celldata.read_cell_manifest(str(tmp_path / "cells" / "cell_crops" / celldata.MANIFEST_FILE))
    lab_of = dict(zip(crops.path, crops.lab))
    split = SplitManifest.read(str(tmp_path / "cells" / "split_manifest.csv"))
    assert card.split_manifest_sha256 == split.sha256 and len(split) == len(crops)
    assert {lab_of[row.path] for row in split.rows} == {celldata.ALL_IDB, celldata.BCCD}
    assert {lab_of[row.path] for row in split.rows if row.split == "train"} == {celldata.ALL_IDB, celldata.BCCD}


def test_several_data_roots_must_be_laboratories_roots(two_labs, tmp_path, monkeypatch):
    """A second --data root of no laboratory's layout (or with --manifest) fails before Ray starts,
    naming the root and the layouts it may have."""
    from jobs.train import main

    monkeypatch.setattr("pipelines.init_ray", lambda *a, **k: pytest.fail("Ray started"))
    (tmp_path / "fields" / "Benign").mkdir(parents=True)
    common = ["--recipe", "cell_blast", "--output", str(tmp_path / "runs"), "--set", "pretrained=false"]
    with pytest.raises(SystemExit) as failed:
        main([*common, "--data", str(two_labs / "all-idb"), str(tmp_path / "fields")])
    message = str(failed.value)
    assert f"{tmp_path / 'fields'} is not laid out like ALL-IDB" in message
    assert "BCCD (JPEGImages + Annotations)" in message and "Taleqani" in message
    with pytest.raises(SystemExit, match="--manifest reads one --data root"):
        main([*common, "--data", str(two_labs / "all-idb"), str(two_labs / "bccd"),
              "--manifest", str(tmp_path / "cells.csv")])
