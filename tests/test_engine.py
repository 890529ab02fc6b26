import copy
import math

import pytest
import torch

from allcore.training import engine
from allcore.models.registry import create_model
from allcore.models.recipes import Recipe


def _loader(n=24, classes=2, size=32, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    x[y == 1] += 1.0  # learnable signal
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _recipe(**kw):
    return Recipe(name="t", model="mobilenet_v2", pretrained=False, **kw)


class CountingAdam(torch.optim.Adam):
    steps = 0

    def step(self, *a, **k):
        CountingAdam.steps += 1
        return super().step(*a, **k)


def test_train_one_epoch_steps_once_per_batch_and_learns():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=2, input_size=32)
    optimizer = CountingAdam(model.parameters(), lr=1e-3)
    device = torch.device("cpu")
    mixed_precision = engine.MixedPrecision.resolve(device, mixed_precision=True)
    assert not mixed_precision.enabled, "no autocast on CPU"
    loader = _loader()
    first = engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), optimizer, loader, device,
                                   mixed_precision, mixed_precision.scaler())
    assert CountingAdam.steps == len(loader)
    assert first["train_steps"] == len(loader) and first["train_images"] == 24
    for _ in range(4):
        last = engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), optimizer, loader, device,
                                      mixed_precision, mixed_precision.scaler())
    assert last["train_loss"] < first["train_loss"]
    result = engine.evaluate(model, loader, device, mixed_precision, num_classes=2)
    assert set(result) == {"val_loss", "val_acc", "val_macro_f1", "val_images"}
    assert result["val_images"] == 24


def _fit(model, recipe, **kw):
    return engine.fit(model, torch.nn.CrossEntropyLoss(), _loader(), _loader(seed=1),
                      torch.device("cpu"), recipe, num_classes=2, **kw)


def test_fit_hands_out_a_state_that_resumes_the_schedule_where_it_stopped():
    recipe = _recipe(epochs=3, schedule="one_cycle", lr=1e-2)
    torch.manual_seed(0)
    states, lines = [], []
    history = _fit(create_model("mobilenet_v2", num_classes=2, input_size=32), recipe,
                   on_epoch_end=lambda row, state: states.append(copy.deepcopy(state)),
                   log=lines.append)
    assert [row["epoch"] for row in history] == [0, 1, 2] and len(lines) == 3
    assert [state["epoch"] for state in states] == [0, 1, 2]
    assert set(history[0]) >= {"lr", "train_loss", "val_loss", "val_macro_f1", "epoch_seconds"}

    started = []
    model = create_model("mobilenet_v2", num_classes=2, input_size=32)
    model.load_state_dict(states[0]["model"])
    resumed = _fit(model, recipe, resume=states[0], on_epoch_start=started.append)
    assert started == [1, 2]
    assert [row["resumed_at_epoch"] for row in resumed] == [0, 1, 1]
    # the one-cycle schedule continues (a fresh schedule would start epoch 1 at its low rate)
    assert [row["lr"] for row in resumed] == pytest.approx([row["lr"] for row in history])


def test_fit_stops_early_when_the_validation_loss_stalls():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=2, input_size=32)
    model.freeze_backbone()  # with lr 0 nothing changes, not even BatchNorm statistics
    history = _fit(model, _recipe(epochs=5, lr=0.0, early_stopping_patience=1))
    assert [row["epoch"] for row in history] == [0, 1]


def test_l1_penalty_is_added_for_mobilenet_m():
    model = create_model("mobilenet_m", num_classes=2, input_size=32).eval()
    logits, target = model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])
    plain = torch.nn.functional.cross_entropy(logits, target)
    total = engine.loss_fn(model, torch.nn.CrossEntropyLoss(), logits, target)
    assert torch.isclose(total - plain, 0.015 * model.l1_penalty())


def test_discriminative_rates_and_schedules():
    model = create_model("mobilenet_v2", num_classes=2, input_size=32)
    optimizer = engine.build_optimizer(model, _recipe(lr=1e-2, backbone_lr_mult=0.1))
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, pytest.approx(1e-3)]
    assert engine.build_scheduler(optimizer, _recipe(), 5) is None
    plateau = engine.build_scheduler(optimizer, _recipe(schedule="plateau", plateau_patience=0), 5)
    plateau.step(1.0)
    plateau.step(2.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # factor 0.1 after patience


def test_early_stopping_counts_epochs_without_improvement():
    stopper = engine.EarlyStopping(patience=2)
    assert [stopper.step(v) for v in (1.0, 0.9, 0.95, 0.91)] == [False, False, False, True]
    assert not any(engine.EarlyStopping(patience=0).step(v) for v in (1, 2, 3, 4))


def test_lr_finder_restores_weights_and_suggests_a_finite_rate():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=2, input_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr, curve = engine.find_lr(model, torch.nn.CrossEntropyLoss(), _loader(), torch.device("cpu"),
                               _recipe(), num_steps=12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert math.isfinite(lr) and 1e-7 <= lr <= 10 and len(curve) >= 3


def test_suggest_lr_finds_the_steepest_descent():
    lrs = [10 ** (-6 + i * 0.25) for i in range(25)]
    losses = [2.0 - 1.5 / (1 + math.exp(-(math.log10(lr) + 3) * 3)) for lr in lrs]  # drop at 1e-3
    losses[-3:] = [3.0, 5.0, 9.0]  # divergence
    assert 10 ** -3.5 <= engine.suggest_lr(list(zip(lrs, losses))) <= 10 ** -2.5


def test_suggest_lr_gives_no_rate_when_the_loss_never_falls():
    lrs = [10 ** (-7 + i * 0.5) for i in range(12)]
    assert engine.suggest_lr([(lr, 1.0 + i) for i, lr in enumerate(lrs)]) is None
