"""``VLMDPOTrainer.train()`` under live DeepSpeed ZeRO-2 and ZeRO-3 on CPU, on the tiny LLaVA.

One process, gloo, ``DPOConfig(deepspeed=..., use_cpu=True)``: TRL, transformers and
accelerate build the engine as they would on a GPU node. What is checked here is what
the unit tests of the tuning and of ``DeepSpeedStepSkips`` cannot show:

- the adapter tunes the buckets after TRL's ``__init__`` by rewriting
  ``args.hf_deepspeed_config.config`` in place; only the live engine can say whether
  accelerate really built it from those values;
- DeepSpeed discards a NaN step inside ``engine.backward``; the guarded ``optimizer.step``
  the Trainer calls afterwards must count that skip once, in the guards and in
  ``vlm_dpo/skipped_steps``, and must not step again.

Tiny LLaVA at width 32, default freeze policy (only the language model trains): the tuned
reduce/allgather bucket is the trainable-parameter count (below the one-rank floor of
1e6), prefetch 0.9 x 32^2 -> 921, persistence 10 x 32 = 320; DeepSpeed's own defaults are
5e8, 5e7 and 1e5.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest

pytest.importorskip("deepspeed")
trl = pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback  # noqa: E402
from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: E402
from vlm_dpo_plugins.adapters.trl import VLMDPOTrainer  # noqa: E402

from vlm_dpo_plugins.tiny import build_tiny_llava, make_preference_examples, trl_conversational_rows  # noqa: E402

POISONED = "model.language_model.layers.0.mlp.up_proj.weight"
STEPS = 4
NAN_AT = 1  # a step was taken before it, so "unchanged by the skip" is not just "never trained"
EXPLICIT_ALLGATHER = 100_000  # written by the user: the tuning must leave it alone
HIDDEN = 32
MISLEADING_WARNING = "the optimizer was passed in"


def user_deepspeed_config(stage: int) -> dict:
    # As transformers' example configs write it: "auto" for what the Trainer fills, the reduce bucket left to tooling.
    zero = {"stage": stage, "reduce_bucket_size": "auto"}
    if stage == 2:
        zero["allgather_bucket_size"] = EXPLICIT_ALLGATHER
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def local(parameter: torch.Tensor) -> torch.Tensor:
    return getattr(parameter, "ds_tensor", parameter)  # ZeRO-3 keeps only this rank's shard in the module


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: local(p).detach().clone() for name, p in model.named_parameters()}


def trainable_elements(model) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


class NanAtStep(TrainerCallback):
    """NaN into one gradient during the backward of optimizer step ``step``; records what every step did.

    A tensor hook poisons the gradient before DeepSpeed's own hooks copy it into its partitions, where one
    bf16 overflow in one layer would put it.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.trainer = None
        self.handle = None
        self.before: dict[str, torch.Tensor] = {}
        self.steps: list[dict] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = snapshot(model)
        if state.global_step == self.step:
            weight = dict(model.named_parameters())[POISONED]
            self.handle = weight.register_hook(lambda grad: grad.index_fill(0, torch.tensor([0]), math.nan))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        after = snapshot(model)
        self.steps.append(
            {
                "changed": any(not torch.equal(after[name], value) for name, value in self.before.items()),
                "deepspeed_skipped": self.trainer.model_wrapped.skipped_steps,
            }
        )


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run(model_dir, rows, output_dir, stage: int, *, model_first: bool = False, vlm_dpo_config=None) -> dict:
    """Build and train as a user would; what the adapter wrote before train() and what the engine then held.

    By default the DPOConfig comes first and the model second, the order of TRL's scripts: under ZeRO-3
    transformers then builds the model inside ``zero.Init``, already partitioned. ``model_first`` loads it
    before any DeepSpeed config exists.
    """
    unset_hf_deepspeed_config()  # a config left by an earlier run must not partition a model loaded here
    model = AutoModelForImageTextToText.from_pretrained(model_dir) if model_first else None
    torch.manual_seed(0)
    args = trl.DPOConfig(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        deepspeed=user_deepspeed_config(stage),
    )
    injector = NanAtStep(NAN_AT)
    captured = Captured()
    adapter_logger = logging.getLogger("vlm_dpo_plugins.adapters")
    adapter_logger.addHandler(captured)
    try:
        trainer = VLMDPOTrainer(
            model=model if model is not None else AutoModelForImageTextToText.from_pretrained(model_dir),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoProcessor.from_pretrained(model_dir),
            callbacks=[injector],
            vlm_dpo_config=vlm_dpo_config,
        )
        injector.trainer = trainer
        written = copy.deepcopy(trainer.args.hf_deepspeed_config.config["zero_optimization"])
        trainable = trainable_elements(trainer.model)
        trainer.train()
    finally:
        adapter_logger.removeHandler(captured)
    return {
        "trainer": trainer,
        "engine": trainer.model_wrapped,
        "written": written,
        "user_config": args.deepspeed,
        "trainable": trainable,
        "steps": injector.steps,
        "messages": captured.messages,
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def rows():
    return trl_conversational_rows(make_preference_examples(16, seed=3))


@pytest.fixture(scope="module")
def deepspeed_runs(deepspeed_process_group, model_dir, rows, tmp_path_factory):
    runs = {}

    def get(name: str) -> dict:
        if name not in runs:
            stage = 2 if name == "zero2" else 3
            runs[name] = run(model_dir, rows, tmp_path_factory.mktemp(name), stage, model_first=name == "zero3")
        return runs[name]

    yield get
    runs.clear()
    unset_hf_deepspeed_config()  # later test modules load models outside any DeepSpeed run


def expected_bucket(trainable: int) -> int:
    # min(max(h^2, 1e6 x ranks), ceiling, trainable), even: with one rank and a tiny model, the trainable count.
    assert HIDDEN**2 < trainable < 1_000_000
    return trainable + trainable % 2


# -- ZeRO-2 --------------------------------------------------------------------------------------------------------


@pytest.mark.reliability("TRL", row="zero2")
def test_zero2_buckets_the_adapter_tuned_are_what_the_live_optimizer_holds(deepspeed_runs):
    result = deepspeed_runs("zero2")
    engine, bucket = result["engine"], expected_bucket(result["trainable"])
    assert result["written"]["reduce_bucket_size"] == bucket
    assert result["written"]["allgather_bucket_size"] == EXPLICIT_ALLGATHER
    assert type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"
    assert engine.optimizer.reduce_bucket_size == bucket  # "auto" filled; DeepSpeed alone would take 5e8
    assert engine.optimizer.allgather_bucket_size == EXPLICIT_ALLGATHER  # the user's value, untouched
    assert result["user_config"]["zero_optimization"]["reduce_bucket_size"] == "auto", "the user's dict is not edited"


@pytest.mark.reliability("TRL", row="zero2")
def test_zero2_nan_gradient_is_skipped_by_deepspeed_and_counted_once(deepspeed_runs):
    result = deepspeed_runs("zero2")
    trainer, engine = result["trainer"], result["engine"]
    assert trainer.state.global_step == STEPS, "training went on after the skip"
    assert [step["deepspeed_skipped"] for step in result["steps"]] == [0, 1, 1, 1]
    assert [step["changed"] for step in result["steps"]] == [True, False, True, True]
    assert engine.skipped_steps == 1
    assert trainer.plugins.get_plugin("guards").skipped_steps == 1
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["vlm_dpo/skipped_steps"] for entry in logs] == [0, 1, 1, 1]
    outcomes = trainer.vlm_dpo_step_outcomes
    assert [outcome.skipped for outcome in outcomes] == [False, True, False, False]
    assert outcomes[NAN_AT].reasons == ("non-finite gradient norm; skipped by DeepSpeed",)
    # Never stepped twice: the torch AdamW inside ZeRO counted exactly the three steps DeepSpeed took.
    inner = engine.optimizer.optimizer
    adam_steps = {int(state["step"]) for state in inner.state.values()}
    assert adam_steps == {STEPS - 1}
    assert all(torch.isfinite(local(p)).all() for p in trainer.model.parameters())


def test_zero2_run_warns_nothing_about_an_optimizer_passed_in(deepspeed_runs):
    assert not [message for message in deepspeed_runs("zero2")["messages"] if MISLEADING_WARNING in message]


def test_zero2_trains_with_the_policy_param_groups(deepspeed_runs):
    # The adapter's own groups (one per freeze group) are what ZeRO partitions; the frozen tower stays out of it.
    result = deepspeed_runs("zero2")
    inner = result["engine"].optimizer.optimizer
    assert [group.get("group") for group in inner.param_groups] == ["language"]
    frozen = [p for name, p in result["trainer"].model.named_parameters() if "vision_tower" in name]
    assert frozen and not any(p.requires_grad for p in frozen)


# -- ZeRO-3 --------------------------------------------------------------------------------------------------------


def assert_zero3_engine_holds_the_tuned_sizes(result) -> None:
    engine, bucket = result["engine"], expected_bucket(result["trainable"])
    assert result["written"] == {
        "stage": 3,
        "reduce_bucket_size": bucket,
        "stage3_prefetch_bucket_size": 921,
        "stage3_param_persistence_threshold": 320,
    }
    optimizer = engine.optimizer
    assert type(optimizer).__name__ == "DeepSpeedZeroOptimizer_Stage3"
    assert optimizer.reduce_bucket_size == bucket
    assert optimizer.parameter_offload._prefetch_bucket_sz == 921  # DeepSpeed's default: 50,000,000
    assert optimizer.parameter_offload.param_numel_persistence_threshold == 320  # default 100,000


@pytest.mark.reliability("TRL", row="zero3")
def test_zero3_tuned_sizes_reach_the_engine_and_a_nan_step_is_skipped_once(deepspeed_runs):
    result = deepspeed_runs("zero3")
    assert_zero3_engine_holds_the_tuned_sizes(result)
    trainer = result["trainer"]
    assert trainer.state.global_step == STEPS
    assert [step["deepspeed_skipped"] for step in result["steps"]] == [0, 1, 1, 1]
    assert [step["changed"] for step in result["steps"]] == [True, False, True, True]
    assert trainer.plugins.get_plugin("guards").skipped_steps == 1
    assert [entry["vlm_dpo/skipped_steps"] for entry in trainer.state.log_history if "loss" in entry] == [0, 1, 1, 1]
    assert all(torch.isfinite(local(p)).all() for p in trainer.model.parameters())


def test_zero3_with_the_model_built_inside_zero_init(deepspeed_process_group, model_dir, rows, tmp_path):
    try:
        result = run(model_dir, rows, tmp_path, 3)
    finally:
        unset_hf_deepspeed_config()
    assert_zero3_engine_holds_the_tuned_sizes(result)
    assert result["trainer"].plugins.get_plugin("guards").skipped_steps == 1
