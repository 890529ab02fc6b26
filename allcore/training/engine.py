"""The training loop shared by every recipe, in plain PyTorch (no Ray).

:func:`fit` is the loop: the Ray Train worker (``pipelines/train.py``) and the benchmark both call
it, so they time and train the same thing. Autocast and gradient scaling are decided once in
:class:`MixedPrecision` before the loop; ``train_one_epoch`` and ``evaluate`` take every input
explicitly so they can be tested on their own. Reporting and checkpointing are the caller's,
through ``on_epoch_end``, which keeps this module free of Ray.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from allcore.training import distributed
from allcore.evaluation import metrics
from allcore.models.registry import probabilities
from allcore.models.recipes import Recipe


@dataclass(frozen=True)
class MixedPrecision:
    """Mixed-precision (autocast + gradient scaling) settings resolved for one device.

    On CUDA when the recipe asks for mixed precision: bf16 autocast where the GPU has it (no
    gradient scaling needed), else fp16 autocast with a GradScaler. Full fp32 elsewhere (CPU
    autocast is slower than fp32 for these convnets, so it is not used).
    """

    device_type: str
    dtype: torch.dtype | None

    @classmethod
    def resolve(cls, device: torch.device, mixed_precision: bool) -> "MixedPrecision":
        if mixed_precision and device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            return cls(device.type, torch.bfloat16 if bf16 else torch.float16)
        return cls(device.type, None)

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def unwrap(model: nn.Module) -> nn.Module:
    """The user model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def build_optimizer(model: nn.Module, recipe: Recipe, lr: float | None = None) -> torch.optim.Optimizer:
    """Two parameter groups so the body can learn slower than the head (discriminative rates)."""
    base = unwrap(model)
    lr = recipe.lr if lr is None else lr
    groups = [
        {"params": [p for p in base.head_parameters() if p.requires_grad], "lr": lr},
        {"params": [p for p in base.backbone_parameters() if p.requires_grad],
         "lr": lr * recipe.backbone_lr_mult},
    ]
    groups = [g for g in groups if g["params"]]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(groups, weight_decay=recipe.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    """Returns the scheduler, or None for a constant rate.

    One-cycle steps every batch; plateau steps once per epoch on the validation loss.
    """
    if recipe.schedule == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            epochs=recipe.epochs,
            steps_per_epoch=max(1, steps_per_epoch),
        )
    if recipe.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=recipe.plateau_factor,
            patience=recipe.plateau_patience, min_lr=recipe.min_lr,
        )
    return None


def loss_fn(model: nn.Module, criterion: nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus the model's L1 penalty on its final layer (MobileNet_M uses 0.015)."""
    loss = criterion(logits, target)
    base = unwrap(model)
    if base.l1_head:
        loss = loss + base.l1_head * base.l1_penalty()
    return loss


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    device: torch.device,
    mixed_precision: MixedPrecision,
    scaler: torch.amp.GradScaler,
    batch_scheduler=None,
) -> dict[str, float]:
    """One pass over ``loader``. Steps the optimizer exactly once per batch.

    Loss and accuracy are summed over every rank of a process group (``allcore.training.distributed``):
    they describe the whole training split, not this worker's shard of it. ``train_images``
    counts the images of the epoch over all ranks, ``train_steps`` the optimizer steps.
    """
    model.train()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with mixed_precision.autocast():
            logits = model(images)
            loss = loss_fn(model, criterion, logits, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if batch_scheduler is not None:
            batch_scheduler.step()
        n = target.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == target).sum().item()
        seen += n
        steps += 1
    total_loss, correct, seen = distributed.all_sum([total_loss, correct, seen], device)
    if seen == 0:
        raise ValueError("the training loader yielded no batches: is the training split empty?")
    return {"train_loss": total_loss / seen, "train_acc": correct / seen,
            "train_images": int(seen), "train_steps": steps}


def predict(model: nn.Module, loader: Iterable, device: torch.device,
            mixed_precision: MixedPrecision):
    """Class probabilities and labels for every batch of ``loader`` (numpy arrays)."""
    probs, labels = [], []
    for images, target in loader:
        with mixed_precision.autocast():
            probs.append(probabilities(model, images.to(device, non_blocking=True)).cpu().numpy())
        labels.append(np.asarray(target))
    return np.concatenate(probs), np.concatenate(labels)


def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             mixed_precision: MixedPrecision, num_classes: int) -> dict[str, float]:
    """Validation loss (plain cross-entropy), accuracy and macro-F1 over every rank's share of
    the validation split (``allcore.training.distributed.shard``): each image evaluated once, and the
    same numbers on every rank, so plateau LR, early stopping and the checkpoint score agree.

    The model inside a DDP wrapper predicts: DDP's forward may broadcast buffers, a collective
    that ranks with different numbers of validation batches would not match.
    """
    probs, labels = predict(unwrap(model), loader, device, mixed_precision)
    picked = probs[np.arange(len(labels)), labels]
    picked, pred, labels = distributed.gather(picked, probs.argmax(1), labels)
    if len(labels) == 0:
        raise ValueError("the validation split is empty: use a larger dataset or change split")
    return {
        "val_loss": float(-np.log(np.clip(picked, 1e-12, None)).mean()),
        "val_acc": float((pred == labels).mean()),
        "val_macro_f1": float(metrics.macro_f1(labels, pred, num_classes)),
        "val_images": len(labels),
    }


class EarlyStopping:
    """Stops after ``patience`` epochs without a lower validation loss (0 disables)."""

    def __init__(self, patience: int, best: float = math.inf, bad_epochs: int = 0):
        self.patience = patience
        self.best = best
        self.bad_epochs = bad_epochs

    def step(self, val_loss: float) -> bool:
        """Record one epoch; True when training should stop."""
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}


EpochEndCallback = Callable[[dict[str, Any], dict[str, Any]], None]


def fit(
    model: nn.Module,
    criterion: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    device: torch.device,
    recipe: Recipe,
    *,
    num_classes: int,
    lr: float | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    on_epoch_end: EpochEndCallback | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` (already on ``device``) for the recipe's epochs and return the history rows.

    Mixed precision, optimizer, schedule and early stopping are built here, once, from the recipe
    (``lr`` overrides ``recipe.lr``, e.g. with an LR-finder suggestion). ``resume`` is a state
    from :func:`checkpoint_state` (the model's weights already loaded by the caller): training
    continues after its epoch with its optimizer, schedule, scaler and early-stopping counters.

    After every epoch ``on_epoch_end(row, state)`` gets the history row and the resumable state
    (plain data); a caller reports and checkpoints there. ``log`` receives one progress line per
    epoch (None: silent). Loaders whose dataset, sampler or batch sampler has ``set_epoch``
    (the augmenting datasets, ``allcore.training.distributed.GlobalBatchSampler``) are told the epoch
    first, so augmentation and shuffling differ per epoch yet repeat after a resume.
    """
    mixed_precision = MixedPrecision.resolve(device, recipe.mixed_precision)
    scaler = mixed_precision.scaler()
    lr = recipe.lr if lr is None else lr
    optimizer = build_optimizer(model, recipe, lr=lr)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch=len(train_loader))
    stopper = EarlyStopping(recipe.early_stopping_patience)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        stopper = EarlyStopping(recipe.early_stopping_patience, **resume["early_stopping"])
        history, start_epoch = list(resume["history"]), resume["epoch"] + 1
        _log(log, f"resumed from the checkpoint of epoch {resume['epoch']}")

    batch_scheduler = scheduler if recipe.schedule == "one_cycle" else None
    for epoch in range(start_epoch, recipe.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        for part in (getattr(train_loader, name, None)
                     for name in ("dataset", "sampler", "batch_sampler")):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
        started, cpu_started = time.perf_counter(), time.process_time()
        # workers: an elastic run (pipelines/train.py) goes on with fewer after losing a node
        row = {"epoch": epoch, "resumed_at_epoch": start_epoch,
               "workers": distributed.world()[1], "lr": optimizer.param_groups[0]["lr"]}
        row.update(train_one_epoch(model, criterion, optimizer, train_loader, device,
                                   mixed_precision, scaler, batch_scheduler))
        row.update(evaluate(model, val_loader, device, mixed_precision, num_classes))
        row["epoch_seconds"] = time.perf_counter() - started
        # CPU seconds of this process (all its threads): the work an epoch took, which the load
        # of other processes on a shared node moves far less than the wall time
        row["epoch_cpu_seconds"] = time.process_time() - cpu_started
        if recipe.schedule == "plateau":
            scheduler.step(row["val_loss"])
        stop = stopper.step(row["val_loss"])
        history.append(row)
        if on_epoch_end is not None:
            on_epoch_end(row, checkpoint_state(model, epoch=epoch, lr=lr, history=history,
                                               optimizer=optimizer, scheduler=scheduler,
                                               scaler=scaler, stopper=stopper))
        _log(log, f"epoch {epoch + 1}/{recipe.epochs} "
                  f"train_loss={row['train_loss']:.4f} train_acc={row['train_acc']:.3f} "
                  f"val_loss={row['val_loss']:.4f} val_acc={row['val_acc']:.3f} "
                  f"val_macro_f1={row['val_macro_f1']:.3f} ({row['epoch_seconds']:.0f}s)")
        if stop:
            _log(log, f"early stopping: no val-loss improvement for "
                      f"{recipe.early_stopping_patience} epochs")
            break
    return history


def checkpoint_state(model: nn.Module, *, epoch: int, lr: float, history: list[dict],
                     optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                     stopper: EarlyStopping) -> dict[str, Any]:
    """Everything :func:`fit` needs to resume after ``epoch``, as tensors and plain data (what
    ``torch.load(weights_only=True)`` accepts). ``lr`` is the base rate the optimizer was built
    with, so a resumed run rebuilds the same schedule."""
    return {"model": unwrap(model).state_dict(), "epoch": epoch, "lr": lr, "history": history,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(), "early_stopping": stopper.state_dict()}


def _log(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(f"[allcore] {message}")


def find_lr(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable,
    device: torch.device,
    recipe: Recipe,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 60,
) -> tuple[float | None, list[tuple[float, float]]]:
    """LR range test (Smith 2015, as fastai's ``lr_find``): raise the rate exponentially for a few
    batches and pick the rate of steepest loss descent. The model's weights are restored after.

    With several ranks, ``model`` is the distributed one (DDP, BatchNorm over all ranks) and the
    loader gives each rank its share of every global batch: the steps and the recorded loss are
    the global batch's, so N workers find the rate one worker finds.

    Returns the suggested learning rate (None when the loss never fell: ``suggest_lr``) and the
    (lr, smoothed loss) curve for plotting.
    """
    saved = copy.deepcopy(unwrap(model).state_dict())
    optimizer = build_optimizer(model, recipe, lr=start_lr)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    gamma = (end_lr / start_lr) ** (1 / max(1, num_steps - 1))
    curve: list[tuple[float, float]] = []
    smoothed, best = None, math.inf
    model.train()
    step = 0
    while step < num_steps:
        for images, target in loader:
            factor = gamma**step
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            logits = model(images.to(device))
            loss = loss_fn(model, criterion, logits, target.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # the loss of the whole global batch: every rank follows the same curve, stops at the
            # same step and suggests the same rate, the one a single worker would
            total, count = distributed.all_sum([loss.item() * target.shape[0], target.shape[0]],
                                               device)
            value = total / count
            smoothed = value if smoothed is None else 0.7 * smoothed + 0.3 * value
            curve.append((start_lr * factor, smoothed))
            best = min(best, smoothed)
            step += 1
            if step >= num_steps or not math.isfinite(smoothed) or smoothed > 4 * best:
                step = num_steps
                break
    unwrap(model).load_state_dict(saved)
    return suggest_lr(curve), curve


def suggest_lr(curve: list[tuple[float, float]]) -> float | None:
    """Rate at the steepest descent of the smoothed loss curve (ignoring the divergent tail);
    None when the loss never fell (lowest at the first two rates): there is no descent to pick,
    and any rate below the sweep's start would train nothing."""
    if len(curve) < 3:
        raise ValueError("LR finder needs at least 3 batches; use a larger training split")
    lrs = np.array([lr for lr, _ in curve])
    losses = np.array([loss for _, loss in curve])
    finite = np.isfinite(losses)
    lrs, losses = lrs[finite], losses[finite]
    stop = int(np.argmin(losses)) + 1
    lrs, losses = lrs[:stop], losses[:stop]
    if len(lrs) < 3:
        return None
    slopes = np.gradient(losses, np.log(lrs))
    return float(lrs[int(np.argmin(slopes))])
