"""StepGuard: a non-finite step changes nothing, training goes on; back-off, spikes, framework skips, the halt."""

from __future__ import annotations

import copy

import pytest
import torch

from vlm_dpo_plugins.errors import TrainingHalted
from vlm_dpo_plugins.freeze.apply import apply_trainable
from vlm_dpo_plugins.guards.clipping import parameters_by_group
from vlm_dpo_plugins.guards.spikes import LossSpikeDetector
from vlm_dpo_plugins.guards.step import FRAMEWORK_SKIP_REASON, StepGuard
from vlm_dpo_plugins.manager import create_plugin_manager

transformers = pytest.importorskip("transformers")


def configured(guards=None, block=()):
    manager = create_plugin_manager(load_entry_points=False, block=block)
    manager.hook.vlm_dpo_configure(config=manager.load_config({"guards": guards} if guards else {}))
    return manager


def bits(value):
    """Raw bytes of every tensor in a (nested) state, so equality means bit-identical, not merely ==."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).tolist()
    if isinstance(value, dict):
        return {key: bits(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [bits(item) for item in value]
    return value


def training_state(model, optimizer, scheduler):
    return bits({
        "parameters": dict(model.named_parameters()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "learning_rates": [group["lr"] for group in optimizer.param_groups],
    })


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from vlm_dpo_plugins.tiny import build_tiny_llava

    return transformers.AutoModelForImageTextToText.from_pretrained(build_tiny_llava(tmp_path_factory.mktemp("llava")))


def test_a_nan_gradient_mid_training_changes_nothing_and_training_converges(tiny_llava):
    model = tiny_llava
    manager = configured()
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type=model.config.model_type)
    apply_trainable(model, manager.hook.vlm_dpo_trainable_parameters(groups=groups, step=0))
    by_group = parameters_by_group(model.named_parameters(), groups)
    assert set(by_group) == {"language"}  # the default freeze policy
    optimizer = torch.optim.AdamW([p for params in by_group.values() for p in params], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))  # warm-up
    guard = StepGuard(manager)
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (4, 16))  # a fixed batch to memorise: a learnable objective
    poisoned = by_group["language"][3]
    losses, nan_step = [], 4

    for step in range(14):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == nan_step:
            poisoned.grad.view(-1)[0] = float("nan")
            before = training_state(model, optimizer, scheduler)
        outcome = guard.step(optimizer, by_group, loss, step, scheduler=scheduler)
        assert outcome.skipped == (step == nan_step)
        if step == nan_step:
            assert outcome.reasons == ("non-finite gradient norm (nan) in group(s) language",)
            assert training_state(model, optimizer, scheduler) == before  # weights, Adam moments and step, schedule
            assert all(p.grad is None for p in by_group["language"])  # the bad batch cannot leak into the next
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    assert optimizer.state[poisoned]["step"].item() == 13  # 14 steps, one skipped
    assert scheduler.last_epoch == 13
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[nan_step + 1] == losses[nan_step]  # same weights after the skip, same loss on the same batch
    assert losses[-1] < 0.5 * losses[0], losses
    assert manager.get_plugin("guards").vlm_dpo_metrics(step=13)["vlm_dpo/skipped_steps"] == 1.0


class Recorder:
    """A one-weight SGD run whose step_fn records the learning rate each update actually used."""

    def __init__(self, scheduler_factory):
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.optimizer = torch.optim.SGD([self.weight], lr=1.0)
        self.scheduler = scheduler_factory(self.optimizer)
        self.used: list[float] = []

    def step_fn(self):
        self.used.append(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()

    def run(self, guard, step, loss=1.0, grad=1.0):
        self.weight.grad = torch.tensor([grad])
        outcome = guard.step(self.optimizer, {"language": [self.weight]}, loss, step, scheduler=self.scheduler,
                             step_fn=self.step_fn)
        return outcome, self.optimizer.param_groups[0]["lr"]


def test_back_off_after_a_skip_scales_the_next_steps_then_restores_exactly():
    guard = StepGuard(configured({"lr_backoff_factor": 0.1, "lr_backoff_steps": 2, "max_grad_norm": None}))
    run = Recorder(lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 / (1 + k)))
    after = [run.run(guard, step, grad=float("nan") if step == 2 else 1.0) for step in range(6)]

    # k scheduler steps taken -> scheduled rate 1/(1+k); the skipped step 2 takes none.
    assert [outcome.skipped for outcome, _ in after] == [False, False, True, False, False, False]
    assert run.used == [1.0, 1 / 2, 0.1 * (1 / 3), 0.1 * (1 / 4), 1 / 5]
    assert [outcome.learning_rate_scale for outcome, _ in after] == [1.0, 1.0, 1.0, 0.1, 0.1, 1.0]
    # between steps the optimizer holds exactly the scheduled rate: what the framework logs and the scheduler sees
    assert [rate for _, rate in after] == [1 / 2, 1 / 3, 1 / 3, 1 / 4, 1 / 5, 1 / 6]


def test_back_off_leaves_a_multiplicative_schedule_exactly_where_it_would_have_been():
    def exponential(optimizer):
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)  # reads group["lr"], not base_lrs

    manager = configured({"lr_backoff_factor": 0.5, "lr_backoff_steps": 3})
    guard, plain_guard = StepGuard(manager), StepGuard(configured())
    backed_off, plain = Recorder(exponential), Recorder(exponential)
    for step in range(6):
        if step == 1:
            manager.get_plugin("guards").backoff.trigger()  # what a skip or a spike does
        _, rate = backed_off.run(guard, step)
        _, plain_rate = plain.run(plain_guard, step)
        assert rate == plain_rate  # ==, not approx: the saved float is written back, not divided
    assert backed_off.used == [plain.used[0]] + [0.5 * plain.used[k] for k in (1, 2, 3)] + plain.used[4:]


def test_a_loss_spike_against_the_running_median():
    detector = LossSpikeDetector(window=4, factor=3.0)
    losses = [1.0, 0.8, 1.2, 0.9, 3.2, 3.3, 0.7, 2.0, float("nan"), 9.0, 1.0]
    flags = [detector.observe(loss) for loss in losses]
    # not judged until 4 losses are in; then: 3.2 > 3 x median(1.0, 0.8, 1.2, 0.9) = 2.85 -> spike;
    # 3.3 vs 3 x median(0.8, 1.2, 0.9, 3.2) = 3.15 -> spike; 0.7 no; 2.0 vs 3 x median(0.9, 3.2, 3.3, 0.7) = 6.15 no;
    # NaN is not a loss to judge (the skip guard takes it) and does not enter the window;
    # 9.0 vs 3 x median(3.2, 3.3, 0.7, 2.0) = 7.8 -> spike; 1.0 no.
    assert flags == [False, False, False, False, True, True, False, False, False, True, False]
    assert detector.spikes == 3 and list(detector.recent) == [0.7, 2.0, 9.0, 1.0]


def test_a_loss_spike_is_a_metric_and_optionally_backs_the_learning_rate_off(caplog):
    manager = configured(
        {"spike_window": 3, "lr_backoff_factor": 0.5, "lr_backoff_steps": 1, "lr_backoff_on": ["spike"]}
    )
    guard = StepGuard(manager)
    run = Recorder(lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0))
    for step, loss in enumerate([1.0, 1.0, 1.0, 4.0, 1.0, 1.0]):
        run.run(guard, step, loss=loss)
    assert run.used == [1.0, 1.0, 1.0, 1.0, 0.5, 1.0]  # the step after the spike, for lr_backoff_steps=1
    assert manager.get_plugin("guards").vlm_dpo_metrics(step=5)["vlm_dpo/loss_spikes"] == 1.0
    assert caplog.messages == [
        "step 3: loss spike, 4 > 3 x the median 1 of the previous 3 losses; learning rate backed off"
    ]


def test_when_the_framework_skipped_the_step_the_guard_counts_it_and_never_steps():
    manager = configured()
    guard = StepGuard(manager)
    run = Recorder(lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 / (1 + k)))
    run.weight.grad = torch.tensor([1.0])
    outcome = guard.step(run.optimizer, None, 0.7, 3, scheduler=run.scheduler, step_fn=run.step_fn,
                         framework_skipped=True, grad_norm=float("inf"))
    assert outcome.skipped and outcome.reasons == (FRAMEWORK_SKIP_REASON,)
    taken = guard.step(run.optimizer, None, 0.7, 4, scheduler=run.scheduler, step_fn=run.step_fn,
                       framework_skipped=False, grad_norm=0.5)
    assert not taken.skipped
    assert run.used == [] and run.scheduler.last_epoch == 0 and run.weight.item() == 0.0  # stepped by nobody
    plugin = manager.get_plugin("guards")
    assert (plugin.skipped_steps, plugin.consecutive_skips) == (1, 0)
    assert plugin.vlm_dpo_metrics(step=4)["vlm_dpo/grad_norm"] == 0.5


def test_after_k_skips_in_a_row_a_checkpoint_is_saved_then_training_halts():
    guard = StepGuard(configured({"max_consecutive_skips": 2, "max_grad_norm": None}))
    run = Recorder(lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0))
    events = []

    def save_checkpoint():
        events.append(("saved", run.weight.item()))
        return "/runs/x/checkpoint-12"

    run.run(guard, 10)
    guard.step(run.optimizer, {"language": [run.weight]}, float("nan"), 11, save_checkpoint=save_checkpoint)
    assert events == []
    with pytest.raises(TrainingHalted) as halted:
        guard.step(run.optimizer, {"language": [run.weight]}, float("nan"), 12, save_checkpoint=save_checkpoint)
    assert events == [("saved", -1.0)]  # the weights of step 10, the last step taken
    assert str(halted.value).startswith(
        "2 consecutive optimizer steps skipped (last at step 12: non-finite loss (nan))"
    )
    assert str(halted.value).endswith(
        "A checkpoint was saved to /runs/x/checkpoint-12: it holds the weights of the last step taken, "
        "since the skipped steps changed nothing."
    )


def test_a_failed_save_is_reported_with_the_halt():
    guard = StepGuard(configured({"max_consecutive_skips": 1}))
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)

    def save_checkpoint():
        raise OSError("disk full")

    with pytest.raises(TrainingHalted, match=r"Saving a checkpoint before stopping failed too: OSError\('disk full'\)"):
        guard.step(optimizer, {"language": [weight]}, float("inf"), 0, save_checkpoint=save_checkpoint)


def test_with_the_guards_blocked_the_step_is_a_plain_step():
    guard = StepGuard(configured(block=["guards"]))
    run = Recorder(lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0))
    outcome, _ = run.run(guard, 0, loss=float("nan"), grad=2.0)
    assert not outcome.skipped and outcome.grad_norms is None and run.weight.item() == -2.0


def test_taking_the_step_without_an_optimizer_is_refused_with_the_alternative():
    with pytest.raises(ValueError, match=r"needs the optimizer .* pass framework_skipped=True/False"):
        StepGuard(configured()).step(None, None, 0.5, 0)
