"""N training workers that train the model one worker would: the recipe's batch is global.

A recipe's ``batch_size`` and ``lr`` describe one optimizer step over ``batch_size`` images. With
N workers (``torch.distributed``, e.g. under Ray Train) that step stays the same:

* :class:`GlobalBatchSampler` cuts every epoch into the batches one worker would take, in the same
  seeded order, and gives each worker its 1/N of every batch: the same number of optimizer steps
  on every worker (DDP needs that), each image once per epoch, none padded or repeated.
  DistributedDataParallel averages the gradients of the N shares, which is the gradient of the
  whole batch, so the learning rate needs no scaling.
* :func:`synchronize_batchnorm` makes BatchNorm normalise with the statistics of the whole batch
  (``torch.nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` on CPU), not of each worker's
  share: a share of 1/N of the batch gives
  noisier statistics and running averages than the recipe was tuned with.
* :func:`all_sum` and :func:`gather` turn each worker's metric counts into the whole data's, so a
  history row describes every image, not one worker's shard; :func:`shard` splits the validation
  images so each is evaluated once.

Without an initialised process group (one worker, the benchmark, tests) every function here is
the identity, so ``allcore.training.engine`` calls them unconditionally.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_global_batch(batch_size: int, world_size: int) -> None:
    """A global batch must split into equal shares: DDP averages the shares' gradients, which is
    the whole batch's gradient only when every share weighs the same."""
    if world_size < 1 or batch_size % world_size:
        raise ValueError(f"batch size {batch_size} (the global batch, all workers together) does "
                         f"not split evenly over {world_size} workers: pass --batch-size a "
                         "multiple of --workers")


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch of one epoch (a ``batch_sampler`` for DataLoader).

    The epoch's order is a permutation seeded by (seed, epoch), the same on every rank; it is cut
    into batches of ``batch_size`` (the last, partial one dropped with ``drop_last``), and rank r
    takes the r-th of N contiguous, equal slices of each. With N = 1 these are the batches
    themselves, so 1 and N workers step through the same images in the same order. Call
    ``set_epoch`` before each epoch (``engine.fit`` does).
    """

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        check_global_batch(batch_size, world_size)
        remainder = size % batch_size
        smallest = batch_size if drop_last or remainder == 0 else remainder  # the last batch
        if smallest < world_size:
            raise ValueError(f"{size} training images cannot feed {world_size} workers a share of "
                             "every batch: use fewer workers or more data")
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's batches across all ranks, as one worker would take them."""
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
                 if self.shuffle else np.arange(self.size))
        stop = self.size - self.size % self.batch_size if self.drop_last else self.size
        return [order[start:start + self.batch_size] for start in range(0, stop, self.batch_size)]

    def __iter__(self):
        for batch in self.global_batches():
            # equal slices of a full batch; a partial last batch (drop_last off) nearly equal ones
            yield np.array_split(batch, self.world_size)[self.rank].tolist()

    def __len__(self) -> int:
        """Optimizer steps per epoch: the same on every rank."""
        if self.drop_last:
            return self.size // self.batch_size
        return -(-self.size // self.batch_size)


def shard(dataset: torch.utils.data.Dataset, rank: int, world_size: int) -> torch.utils.data.Dataset:
    """Every ``world_size``-th item from ``rank`` on: the ranks' shards partition the dataset
    (evaluation; no item padded or repeated, so the reduced metrics count each once)."""
    if world_size == 1:
        return dataset
    if len(dataset) < world_size:
        raise ValueError(f"{len(dataset)} validation images cannot be shared by {world_size} "
                         "workers: use fewer workers or a larger validation split")
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """The sum over all ranks of each value (float64 on ``device``: NCCL reduces CUDA tensors)."""
    if world()[1] == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each array concatenated over all ranks (rank order), for metrics that need every item."""
    if world()[1] == 1:
        return arrays
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, arrays)
    return tuple(np.concatenate(column) for column in zip(*parts))


class _AllSum(torch.autograd.Function):
    """Differentiable sum over the ranks: the backward sums the gradients over the ranks too,
    because every rank's loss depends on every rank's input through the sum."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm:
    """Mixin that makes a BatchNorm layer (torch's, or timm's BatchNormAct2d) normalise with the
    statistics of the whole batch over every rank, on CPU (gloo).

    torch's SyncBatchNorm refuses CPU tensors ("SyncBatchNorm expected input tensor to be on
    GPU"), and DDP refuses CPU modules holding one, yet CPU workers are what this project trains
    on without a GPU. In training with more than one rank the per-channel sum, sum of squares
    and count are summed over the ranks in one differentiable all-reduce (its backward sums the
    gradients over the ranks, as torch's backward does); the whole batch's mean and biased
    variance normalise, and the running statistics take the unbiased variance, as torch's do.
    Eval mode and a single rank run the layer's own forward.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or world()[1] == 1:
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        local = torch.cat([input.sum(dims, dtype=torch.float64),
                           input.square().sum(dims, dtype=torch.float64),
                           torch.tensor([input.numel() / channels], dtype=torch.float64)])
        total = _AllSum.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / self.num_batches_tracked.item() if self.momentum is None
                          else self.momentum)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = (1, channels) + (1,) * (input.dim() - 2)
        out = (input - mean.to(input.dtype).view(shape)) * torch.rsqrt(
            var.to(input.dtype).view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        for name in ("drop", "act"):  # BatchNormAct2d's dropout and activation follow its norm
            if hasattr(self, name):
                out = getattr(self, name)(out)
        return out


@functools.cache
def _global_variant(cls: type) -> type:
    return type(f"Global{cls.__name__}", (GlobalBatchNorm, cls), {})


def synchronize_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` (already on its device) with every BatchNorm layer normalising over the whole
    batch of all ranks; parameters, running statistics and state-dict keys stay the same, so
    checkpoints load into the plain model.

    On CUDA the layers become ``torch.nn.SyncBatchNorm`` through timm's conversion, which also
    keeps the activation fused into timm's BatchNormAct2d (EfficientNet, MobileNetV1; torch's
    conversion would drop it). On CPU each layer becomes a subclass of its own class with
    :class:`GlobalBatchNorm`'s forward (no new state, so the class is swapped in place).
    timm is imported only here: only a run with more than one worker needs it.
    """
    if next(model.parameters()).device.type != "cpu":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.__class__ = _global_variant(type(module))
    return model
