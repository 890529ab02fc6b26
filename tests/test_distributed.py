"""N workers train the model one worker would (allcore.training.distributed): the recipe's batch is the
global one, BatchNorm normalises over all ranks, metrics count every image once.

The two-rank runs are real ``torch.distributed`` process groups on CPU (gloo), two spawned
processes, each single-threaded, in float64; the one-rank runs happen in this process. Everything
is seeded, and float64 keeps the rounding of the two summation orders (two ranks sum their shares,
one rank sums the whole batch) far below the tolerances on any CPU: in float32 it reached a few %
of a random-init model's BatchNorm gradients on one machine and not on another."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from allcore.training import distributed, engine
from allcore.training.distributed import GlobalBatchSampler
from allcore.models.registry import create_model
from allcore.models.recipes import Recipe
from allcore.training.build import build_loaders


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_every_rank_takes_its_share_of_the_one_worker_batches(world_size, drop_last):
    one = GlobalBatchSampler(37, 8, seed=3, drop_last=drop_last)
    ranks = [GlobalBatchSampler(37, 8, rank=r, world_size=world_size, seed=3, drop_last=drop_last)
             for r in range(world_size)]
    orders = []
    for epoch in (0, 1):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        batches, shares = list(one), [list(rank) for rank in ranks]
        assert all(len(share) == len(batches) == len(one) for share in shares)  # same steps
        for step, batch in enumerate(batches):
            assert [i for share in shares for i in share[step]] == batch
            if len(batch) == 8:
                assert {len(share[step]) for share in shares} == {8 // world_size}
        seen = [i for share in shares for batch in share for i in batch]
        assert len(seen) == len(set(seen)) == (32 if drop_last else 37)  # each once per epoch
        orders.append(seen)
    assert orders[0] != orders[1], "every epoch is shuffled anew"


def test_a_batch_that_cannot_be_shared_says_what_to_change():
    with pytest.raises(ValueError, match="multiple of --workers"):
        GlobalBatchSampler(40, 6, world_size=4)
    with pytest.raises(ValueError, match="fewer workers"):
        GlobalBatchSampler(33, 8, world_size=2)  # the last batch holds one image for two ranks
    with pytest.raises(ValueError, match="fewer workers"):
        distributed.shard(list(range(3)), 0, 4)


def test_validation_shards_partition_the_split():
    shards = [list(distributed.shard(list(range(11)), r, 3)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))


def _model(name: str, *, pretrained: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, input_size=32, pretrained=pretrained)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # dropout masks come from each process's own random stream
    return model


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.arange(n) % 2
    images[labels == 1] += 1.0  # learnable
    return images, labels


class Recording(torch.utils.data.TensorDataset):
    """Remembers which items this process loaded, per epoch (``engine.fit`` calls set_epoch)."""

    def __init__(self, n: int, seed: int):
        super().__init__(*_data(n, seed))
        self.epoch, self.loaded = 0, {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index):
        self.loaded.setdefault(self.epoch, []).append(int(index))
        return super().__getitem__(index)


FIT = Recipe(name="equivalence", model="mobilenet_v2", input_size=32, epochs=4, batch_size=16,
             lr=3e-4, num_workers=0)
TRAIN_IMAGES, VAL_IMAGES = 132, 30  # 8 full batches of 16 an epoch, the last 4 images dropped


def _distributed(model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    """What pipelines/train.py does to the model with N workers (Ray's prepare_model is DDP)."""
    if world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(distributed.synchronize_batchnorm(model))


def _runs(rank: int, world_size: int, rendezvous: str, out: str) -> None:
    """Every measurement of one rank: one training step of each model on its share of one batch
    of 8, then ``engine.fit`` of the FIT recipe; results land in the folder ``out``."""
    torch.set_num_threads(1)
    # float64 throughout: the comparisons test the arithmetic of sharing a batch, and in float32 a
    # random-init model's BatchNorm over a few 1x1 maps amplifies rounding (which differs with the
    # CPU's kernels) to a few % of some gradients
    torch.set_default_dtype(torch.float64)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                                world_size=world_size)
    images, labels = _data(8, seed=1)
    share = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    for name in ("mobilenet_v2", "mobilenet_m"):
        model = _distributed(_model(name), world_size).train()
        logits = model(images[share])
        torch.nn.functional.cross_entropy(logits, labels[share]).backward()
        base = engine.unwrap(model)
        if rank == 0:
            torch.save({"logits": logits.detach(),
                        "grads": {k: p.grad for k, p in base.named_parameters()
                                  if p.grad is not None},
                        "buffers": dict(base.named_buffers())}, f"{out}/{name}.pt")

    datasets = {"train": Recording(TRAIN_IMAGES, seed=2), "val": Recording(VAL_IMAGES, seed=3)}
    device = torch.device("cpu")
    train, val = build_loaders(datasets, FIT, device, rank=rank, world_size=world_size)
    model = _distributed(_model(FIT.model, pretrained=True), world_size)
    history = engine.fit(model, torch.nn.CrossEntropyLoss(), train, val, device, FIT,
                         num_classes=2)
    torch.save({"history": history, "train": datasets["train"].loaded,
                "val": datasets["val"].loaded[0]}, f"{out}/fit{rank}.pt")  # never set_epoch

    model = _distributed(_model(FIT.model, pretrained=True), world_size)
    suggestion, curve = engine.find_lr(model, torch.nn.CrossEntropyLoss(), train, device, FIT,
                                       num_steps=12)
    torch.save({"lr": suggestion, "curve": curve}, f"{out}/lr{rank}.pt")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-rank")
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    try:
        _runs(0, 1, "", str(out))
    finally:  # this process goes on to run the other tests
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two spawned processes in one gloo process group (a file rendezvous: no port to race)."""
    out = tmp_path_factory.mktemp("two-ranks")
    mp.start_processes(_runs, args=(2, str(out / "rendezvous"), str(out)), nprocs=2,
                       start_method="spawn")
    return out


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_m"])
def test_two_ranks_compute_the_one_rank_forward_gradient_and_batchnorm_statistics(
        name, one_rank, two_ranks):
    """torchvision's BatchNorm2d (mobilenet_v2), timm's BatchNormAct2d and a BatchNorm1d head
    (mobilenet_m): normalised over the whole batch, so the two halves give the whole batch's
    gradient, not the average of two half-batch gradients."""
    one, two = torch.load(one_rank / f"{name}.pt"), torch.load(two_ranks / f"{name}.pt")
    torch.testing.assert_close(two["logits"], one["logits"][:4], rtol=1e-4, atol=1e-4)
    assert one["grads"].keys() == two["grads"].keys()
    difference = sum(((one["grads"][k] - two["grads"][k]) ** 2).sum() for k in one["grads"])
    size = sum((g ** 2).sum() for g in one["grads"].values())
    assert (difference / size).sqrt() < 1e-6
    for key, buffer in one["buffers"].items():
        torch.testing.assert_close(two["buffers"][key], buffer, rtol=1e-6, atol=1e-9)


def test_two_workers_train_the_one_worker_model(one_rank, two_ranks):
    """Same optimizer steps and images an epoch, whole-split metrics, and the same model: every
    epoch's losses within 1e-6 and the same validation accuracy (float64: rounding alone would
    part them by ~1e-11)."""
    one = torch.load(one_rank / "fit0.pt")["history"]
    two = torch.load(two_ranks / "fit0.pt")["history"]
    assert [row["train_steps"] for row in one] == [row["train_steps"] for row in two] == [8] * 4
    assert {row["train_images"] for row in one + two} == {128}
    assert {row["val_images"] for row in one + two} == {VAL_IMAGES}
    for key in ("train_loss", "val_loss", "val_acc"):
        assert [row[key] for row in two] == pytest.approx([row[key] for row in one], rel=1e-6), key
    assert one[-1]["val_acc"] > 0.8, "the comparison needs a model that learned"


def test_two_workers_find_the_one_worker_learning_rate(one_rank, two_ranks):
    """The LR range test steps on the global batch and records its loss: both ranks follow the
    one-rank curve and suggest its rate (no averaging of per-shard guesses)."""
    one = torch.load(one_rank / "lr0.pt")
    ranks = [torch.load(two_ranks / f"lr{rank}.pt") for rank in (0, 1)]
    for two in ranks:
        assert [lr for lr, _ in two["curve"]] == pytest.approx([lr for lr, _ in one["curve"]])
        assert [loss for _, loss in two["curve"]] == pytest.approx(
            [loss for _, loss in one["curve"]], rel=1e-6)
        assert two["lr"] == pytest.approx(one["lr"], rel=1e-9)
    assert len(one["curve"]) >= 3


def test_each_image_is_seen_once_an_epoch_across_ranks(one_rank, two_ranks):
    ranks = [torch.load(two_ranks / f"fit{rank}.pt") for rank in (0, 1)]
    single = torch.load(one_rank / "fit0.pt")
    for epoch in range(FIT.epochs):
        seen = ranks[0]["train"][epoch] + ranks[1]["train"][epoch]
        assert len(seen) == len(set(seen)) == 128
        assert sorted(seen) == sorted(single["train"][epoch])  # the same 128 as one worker's
    val = ranks[0]["val"] + ranks[1]["val"]  # every epoch's validation
    assert sorted(val) == sorted(list(range(VAL_IMAGES)) * FIT.epochs)
