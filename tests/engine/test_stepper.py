"""Stepping: stage order, the granularities, the careful loop's stages, errors and memory."""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from loopscope.engine.experiment import Experiment, load_experiment, seed_everything
from loopscope.engine.probes import UpdateMeter
from loopscope.engine.stepper import LoopHalted, Stepper
from loopscope.shared.history import History
from tests.conftest import FIXTURES

CORE = ["load_batch", "zero_grad", "forward", "loss", "backward", "step"]


def tiny_experiment(rows=30, batch=8, epochs=2, val=True, **options) -> Experiment:
    seed_everything(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(rows, 4, generator=g), torch.randint(0, 3, (rows,), generator=g)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    val_loader = DataLoader(TensorDataset(x[:13], y[:13]), batch_size=5) if val else None
    return Experiment(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True),
        val_loader=val_loader,
        epochs=epochs,
        **options,
    )


def test_stages_run_in_order_one_at_a_time():
    stepper = Stepper(tiny_experiment())
    assert stepper.next_stage() == "load_batch"
    stages = []
    for _ in range(len(CORE) * 2):
        event = stepper.step_stage()
        stages.append((event.iteration, event.stage))
    assert stages == [(1, s) for s in CORE] + [(2, s) for s in CORE]


def test_run_iteration_epoch_and_n_iterations():
    stepper = Stepper(tiny_experiment(rows=30, batch=8, epochs=3))  # 4 batches an epoch
    stepper.step_stage()
    assert [e.stage for e in stepper.run_iteration()] == CORE[1:]
    epoch_events = stepper.run_epoch()
    assert [e.stage for e in epoch_events][-1] == "validate"
    assert stepper.completed_iterations == 4 and stepper.epoch == 2
    stepper.run(5)
    assert stepper.completed_iterations == 9 and stepper.at_boundary
    stepper.run()
    assert stepper.finished and stepper.completed_iterations == 12
    assert stepper.step_stage() is None
    assert stepper.stop_reason == "finished 3 epochs"


def test_run_epoch_without_epoch_end_stages_stops_at_the_epoch_boundary():
    stepper = Stepper(tiny_experiment(rows=30, batch=8, epochs=2, val=False))
    first = stepper.run_epoch()
    assert len(first) == 4 * len(CORE) and stepper.epoch == 2
    second = stepper.run_epoch()
    assert {e.epoch for e in second} == {2} and len(second) == 4 * len(CORE)
    assert stepper.finished


def test_every_stage_records_what_design_lists():
    stepper = Stepper(tiny_experiment())
    events = {e.stage: e for e in stepper.run_iteration()}
    batch = events["load_batch"]
    assert [(t.name, t.shape, t.dtype, t.device) for t in batch.tensors] == [
        ("inputs", (8, 4), "float32", "cpu"),
        ("targets", (8,), "int64", "cpu"),
    ]
    assert sum(batch.metrics["class_counts"].values()) == 8
    forward = events["forward"]
    assert [(t.name, t.module_type) for t in forward.tensors] == [
        ("0", "Linear"),
        ("1", "ReLU"),
        ("2", "Linear"),
        ("output", None),
    ]
    relu = forward.tensors[1]
    assert 0 <= relu.zero_fraction <= 1 and relu.min >= 0
    loss = events["loss"]
    assert loss.loss is not None and loss.metrics["loss_input"] == "logits"
    backward = events["backward"]
    model = stepper.model
    expected = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    assert {layer.name: layer.grad_norm for layer in backward.layers} == pytest.approx(expected, rel=1e-5)
    assert backward.grad_norm == pytest.approx(math.sqrt(sum(v * v for v in expected.values())), rel=1e-5)
    step = events["step"]
    assert step.metrics["lr"] == 0.1
    for layer in step.layers:
        assert layer.update_norm == pytest.approx(0.1 * expected[layer.name], rel=1e-4)  # SGD: lr * grad
        assert layer.update_ratio == pytest.approx(layer.update_norm / layer.weight_norm)
    assert all(e.duration_ms >= 0 for e in events.values())


def test_tensor_statistics_match_torch():
    from loopscope.engine.probes import tensor_stats

    big = torch.randn(300, 400) * 3 + 100  # float32 path above the exact-size limit
    small = torch.tensor([[1.0, 0.0, float("nan")]])
    big_stat, small_stat = tensor_stats([("big", big, None), ("small", small, None)])
    assert big_stat.mean == pytest.approx(big.double().mean().item(), rel=1e-5)
    assert big_stat.std == pytest.approx(big.double().std().item(), rel=1e-2)
    assert (big_stat.min, big_stat.max) == (big.min().item(), big.max().item())
    assert small_stat.nan_count == 1 and small_stat.mean is None
    assert small_stat.zero_fraction == pytest.approx(1 / 3)


def test_nan_and_inf_are_counted_wherever_they_hide():
    from loopscope.engine.probes import tensor_stats

    relu_like = torch.relu(torch.randn(500, 300))  # finite: the quick pass alone
    with_inf = torch.randn(500, 300)
    with_inf[3, 4], with_inf[7, 8] = float("inf"), float("-inf")
    huge = torch.full((400, 300), 3e30)  # finite, but its sum of squares overflows float32
    stats = tensor_stats([("relu", relu_like, None), ("inf", with_inf, None), ("huge", huge, None)])
    relu, inf, big = stats
    assert (relu.nan_count, relu.inf_count) == (0, 0)
    assert relu.zero_fraction == pytest.approx((relu_like == 0).float().mean().item())
    assert relu.min == 0.0 and relu.max == relu_like.max().item()
    assert (inf.nan_count, inf.inf_count, inf.mean) == (0, 2, None)
    assert (big.nan_count, big.inf_count, big.zero_fraction) == (0, 0, 0.0) and big.max == pytest.approx(3e30)


def test_zero_grad_sees_stale_gradients_then_none():
    stepper = Stepper(tiny_experiment())
    stepper.run(1)
    events = {e.stage: e for e in stepper.run_iteration()}
    before, after = events["zero_grad"].metrics["grads_before"], events["zero_grad"].metrics["grads_after"]
    assert before["nonzero"] == 4 and before["norm"] > 0
    assert after["none"] == 4  # set_to_none, PyTorch's default


def test_validation_is_averaged_by_example_count():
    exp = tiny_experiment(rows=30, batch=8, epochs=1)
    stepper = Stepper(exp)
    validate = next(e for e in stepper.run_epoch() if e.stage == "validate")
    model = stepper.model
    model.eval()
    with torch.no_grad():
        rows = [
            (nn.functional.cross_entropy(model(x), y, reduction="sum"), (model(x).argmax(1) == y).sum())
            for x, y in exp.val_loader
        ]
    assert validate.metrics["val_examples"] == 13  # batches of 5, 5, 3
    assert validate.metrics["val_loss"] == pytest.approx(sum(r[0] for r in rows).item() / 13, rel=1e-5)
    assert validate.metrics["val_accuracy"] == pytest.approx(sum(r[1] for r in rows).item() / 13)


def test_validation_leaves_the_model_in_train_mode_and_builds_no_graph():
    exp = tiny_experiment(epochs=2)
    modes = []
    exp.model.register_forward_hook(lambda m, i, o: modes.append((m.training, o.requires_grad)))
    stepper = Stepper(exp)
    stepper.run_epoch()
    val_calls = modes[-3:]  # the 3 validation batches
    assert val_calls == [(False, False)] * 3
    stepper.step_stage()
    stepper.step_stage()
    stepper.step_stage()
    assert modes[-1] == (True, True)


def test_careful_loop_stages_show_when_enabled(tmp_path):
    exp = tiny_experiment(
        rows=30, batch=8, epochs=6, clip_grad_norm=0.01, checkpoint=str(tmp_path / "best.pt"), early_stopping_patience=2
    )
    exp.scheduler = torch.optim.lr_scheduler.StepLR(exp.optimizer, step_size=1, gamma=0.5)
    stepper = Stepper(exp)
    first_epoch = stepper.run_epoch()
    stages = [e.stage for e in first_epoch]
    assert stages[:7] == ["load_batch", "zero_grad", "forward", "loss", "backward", "clip_grad", "step"]
    assert stages[-4:] == ["validate", "scheduler", "checkpoint", "early_stop"]
    clip = next(e for e in first_epoch if e.stage == "clip_grad")
    assert clip.metrics["clipped"] and clip.grad_norm == pytest.approx(0.01, rel=1e-3)
    sched = next(e for e in first_epoch if e.stage == "scheduler")
    assert (sched.metrics["lr_before"], sched.metrics["lr"]) == (0.1, 0.05)
    saved = next(e for e in first_epoch if e.stage == "checkpoint")
    assert saved.metrics["saved"] and (tmp_path / "best.pt").exists()
    best = torch.load(tmp_path / "best.pt")
    assert set(best) == set(stepper.model.state_dict())


def test_early_stopping_ends_the_run():
    exp = tiny_experiment(rows=30, batch=8, epochs=50, early_stopping_patience=2)
    exp.optimizer.param_groups[0]["lr"] = 0.0  # nothing improves after the first validation
    stepper = Stepper(exp)
    stepper.run()
    assert stepper.finished and stepper.epoch == 3
    assert "early stop" in stepper.stop_reason
    stops = [e for e in stepper.history.recent() if e.stage == "early_stop"]
    assert [e.metrics["stop"] for e in stops] == [False, False, True]


def test_validate_every_k_iterations_and_iteration_scheduler():
    exp = tiny_experiment(rows=30, batch=8, epochs=2, validate_every=3, scheduler_interval="iteration")
    exp.scheduler = torch.optim.lr_scheduler.LambdaLR(exp.optimizer, lambda it: 1.0 / (1 + it))
    stepper = Stepper(exp)
    stepper.run()
    stages = [(e.iteration, e.stage) for e in stepper.history.recent() if e.stage in ("validate", "scheduler")]
    validated = [it for it, stage in stages if stage == "validate"]
    assert validated == [3, 6]
    assert sum(1 for _, stage in stages if stage == "scheduler") == 8


def test_a_model_that_raises_gives_an_error_event_at_its_stage():
    stepper = Stepper(load_experiment(str(FIXTURES / "shape_mismatch.py"), 0))
    events = stepper.run_iteration()
    assert [e.stage for e in events] == ["load_batch", "zero_grad", "forward"]
    error = events[-1].error
    assert error.type == "RuntimeError" and "mat1 and mat2" in error.message
    assert "10 features but expects 7" in error.hint
    with pytest.raises(LoopHalted):
        stepper.step_stage()
    stepper.resume()
    assert stepper.step_stage().stage == "load_batch"


def test_an_empty_loader_is_an_error_not_a_hang():
    exp = tiny_experiment()
    exp.train_loader = []
    event = Stepper(exp).step_stage()
    assert event.stage == "load_batch" and "no batches" in event.error.message


def test_a_warning_shows_at_the_stage_that_raised_it_every_time():
    def warning_loss(output, targets):
        warnings.warn("this loss warns on every call", UserWarning)
        return nn.functional.cross_entropy(output, targets)

    experiment = tiny_experiment()
    experiment.loss_fn = warning_loss
    stepper = Stepper(experiment)
    first = {e.stage: e for e in stepper.run_iteration()}
    assert first["loss"].metrics["warnings"] == ["this loss warns on every call"]
    assert not any("warnings" in e.metrics for stage, e in first.items() if stage != "loss")
    stepped = [stepper.step_stage() for _ in range(len(first))]  # one stage at a time, too
    assert [e.stage for e in stepped if "warnings" in e.metrics] == ["loss"]


def test_events_are_immutable_and_picklable():
    event = Stepper(tiny_experiment()).run_iteration()[2]
    with pytest.raises(AttributeError):
        event.loss = 1.0
    assert pickle.loads(pickle.dumps(event)) == event


def test_history_memory_is_bounded_over_long_runs():
    history = History(recent_iterations=50, capacity=256)
    exp = tiny_experiment(rows=8, batch=8, epochs=400, val=False)
    stepper = Stepper(exp, probe=False, history=history)
    stepper.run()
    assert stepper.completed_iterations == 400
    assert {e.iteration for e in history.recent()} == set(range(351, 401))
    loss = history.series["loss"]
    assert loss.total_points == 400 and len(loss) <= 256 and loss.width == 2
    assert sum(p.count for p in loss.points()) == 400
    for _ in range(1_000_000 - 400):
        loss.add(0, 0.5)
    assert len(loss) <= 256 and loss.nbytes() < 64 * 256


def test_frozen_parameters_have_no_gradient_and_do_not_move():
    stepper = Stepper(load_experiment(str(FIXTURES / "dict_rnn_experiment.py"), 0))
    before = stepper.model.frozen_projection.weight.detach().clone()
    events = {e.stage: e for e in stepper.run_iteration()}
    frozen = {layer.name: layer for layer in events["backward"].layers if not layer.trainable}
    assert set(frozen) == {"frozen_projection.weight", "frozen_projection.bias"}
    assert all(layer.grad_norm is None for layer in frozen.values())
    assert torch.equal(stepper.model.frozen_projection.weight, before)
    forward_names = [t.name for t in events["forward"].tensors]
    assert "shared" in forward_names and "shared#2" in forward_names  # a module used twice
    assert "rnn[0]" in forward_names and "rnn[1]" in forward_names  # GRU returns (out, h)


def test_update_sizes_of_nothing_trainable_are_empty_not_an_error():
    # torch's foreach kernels refuse an empty list; a model frozen whole has no update to show.
    meter = UpdateMeter()
    meter.before_step([])
    assert meter.layers([], {}) == []


def test_cuda_device_reports_real_devices():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    stepper = Stepper(tiny_experiment(), "cuda")
    events = stepper.run_iteration()
    assert all(t.device.startswith("cuda") for e in events for t in e.tensors)
    assert "cuda_peak_mb" in events[-1].metrics
    assert stepper._update_meter._buffers == []  # no copy of the model left in "memory allocated"
