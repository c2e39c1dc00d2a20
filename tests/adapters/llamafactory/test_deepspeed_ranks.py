"""``llamafactory-cli train`` with a ZeRO config on two CPU ranks (``FORCE_TORCHRUN=1 NPROC_PER_NODE=2``, gloo),
LLaMA-Factory's own launch.

What kept such a run off this machine was ``use_cpu: true``, not the launch. With it, transformers hands accelerate
``cpu=True`` and never tells it the run is DeepSpeed (``TrainingArguments._setup_devices``: the ``use_cpu`` branch
comes before the ``deepspeed`` one), and accelerate's ``PartialState`` initialises ``deepspeed.comm`` only for
ranks that are not ``cpu`` (``if not cpu and self.backend != "xla"``); it starts torch's gloo group itself. ZeRO-2
does not mind: ``deepspeed.initialize`` adopts that group. ZeRO-3 does: transformers loads the model under
``deepspeed.zero.Init``, which reads its config before initialising DeepSpeed's communication, and the config's
``dist.get_rank()`` fails on the empty backend and is caught as "one rank", so the batch check refuses
(``4 != 2 * 1 * 1``). Without ``use_cpu`` a CPU rank is still a CPU rank (no accelerator is found; DeepSpeed's is
``DS_ACCELERATOR=cpu``), and accelerate initialises ``deepspeed.comm`` over gloo as it does on GPUs. With
``use_cpu: true`` kept, ``tests/support/deepspeed_on_cpu.py`` (DeepSpeed's communication opened on accelerate's gloo
group, as accelerate does on accelerator ranks) is all ZeRO-3 needs: it works here too, but LLaMA-Factory does not
need it (unsetting ``use_cpu`` does), so only ms-swift's tests use it.

- Stock, with ``use_cpu: true``: ZeRO-3 fails on both ranks with DeepSpeed's batch assertion.
- ZeRO-3 (stock, ``use_cpu`` unset), full tuning, a NaN gradient on rank 1 at step 1: DeepSpeed skips the step on
  both ranks (the NaN reaches rank 0 in the reduced gradients), both ranks' plugin state counts it once, and the
  losses, gradient norms and margins equal the same run under DDP. (A NaN *loss* with finite gradients cannot be
  skipped under DeepSpeed: the engine steps inside ``backward``, before the guards vote; they warn on the rank that
  saw it.)
  Full tuning, since with LoRA the run under ZeRO-3 is another run: LLaMA-Factory creates the adapters without
  seeding again after loading the model, and loading under ``zero.Init`` leaves the random generator elsewhere,
  so the LoRA A matrices start elsewhere than under DDP (stock LLaMA-Factory alike; ZeRO-2 starts them as DDP).

- ZeRO-3, rank 1's batches never holding an image: LLaMA-Factory's collator gives a batch without images a 64×64
  white stand-in image (its tokens unattended), so every rank runs the vision tower and gathers its weights in step:
  stock trains, and with the plugins the same run trains as stock and as DDP, the shared step's vision lockstep
  left idle (every rank's batch has images by the time the model sees it).

ZeRO-2 on two ranks (stock, ``use_cpu`` unset) is the ``freeze.unfreeze`` test's in test_distributed.py: the
projector held in ZeRO's optimizer until its stage, every checkpoint's weights, the losses and the gradient norms
equal to the DDP run's.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")
pytest.importorskip("deepspeed", reason="needs deepspeed in the LLaMA-Factory environment")

from fault_matrix import assert_deepspeed_skipped_once, deepspeed_environment, zero_config  # noqa: E402
from fault_plugin import install as install_fault_plugin  # noqa: E402
from llamafactory_runs import (  # noqa: E402
    TINY_MODELS,
    LlamaFactoryRun,
    dpo_config,
    run_llamafactory,
    write_dataset,
    write_mixed_dataset,
)

# A margin is beta times a difference of four log-probs of some 40 nats, each rounded to about 3e-6 in fp32: where
# ZeRO-3 sums the gradients in another order than DDP, the margins agree to about 1e-6, not 1e-7.
TOLERANCE = {
    "loss": dict(rel=1e-5, abs=1e-7),
    "grad_norm": dict(rel=1e-5, abs=1e-7),
    "rewards/margins": dict(rel=1e-5, abs=1e-6),
}
STAND_IN_LOGGED = "vlm-dpo: guards: a rank's batch has no image while another's has"
ONE_RANK_COUNTED = (
    "AssertionError: Check batch related parameters. "
    "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 4 != 2 * 1 * 1"
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_dataset(directory, num_rows=8)
    return directory


def two_ranks(tmp_path, model_dir, dataset, name, env, tuning="lora", **overrides) -> LlamaFactoryRun:
    settings = {"max_steps": 3, **overrides}
    config = dpo_config(TINY_MODELS["llava"], model_dir, dataset, tmp_path / name, tuning, **settings)
    return run_llamafactory(tmp_path / f"cli-{name}", config, env=env, nproc=2)


def zero_file(folder, stage: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"zero{stage}.json"
    path.write_text(json.dumps(zero_config(stage)))
    return str(path)


def test_stock_zero3_with_use_cpu_counts_one_rank(tmp_path, llava, dataset):
    env = {"VLM_DPO_LLAMAFACTORY": "0", **deepspeed_environment()}
    run = two_ranks(tmp_path, llava, dataset, "stock", env, deepspeed=zero_file(tmp_path, 3), use_cpu=True)
    assert run.returncode != 0, run.log()
    for rank in (0, 1):
        assert f"[rank{rank}]: {ONE_RANK_COUNTED}" in run.output, run.log()


def test_zero3_on_two_ranks_skips_a_one_rank_nan_on_both_and_trains_as_ddp(tmp_path, llava, dataset):
    one_rank_nan = install_fault_plugin(tmp_path / "plugins", fault="grad-nan", steps=[1], only_rank=1)
    ddp = two_ranks(tmp_path, llava, dataset, "ddp", one_rank_nan, "full")
    assert ddp.returncode == 0 and "world size: 2" in ddp.output, ddp.log()
    assert [entry["vlm_dpo/skipped_steps"] for entry in ddp.step_logs] == [0, 1, 1], ddp.step_logs

    # use_cpu unset: see the module's docstring.
    env = {**one_rank_nan, **deepspeed_environment()}
    settings = dict(deepspeed=zero_file(tmp_path, 3), save_strategy="steps", save_steps=3, use_cpu=None)
    run = two_ranks(tmp_path, llava, dataset, "zero3", env, "full", **settings)
    assert run.returncode == 0, run.log()
    assert "world size: 2" in run.output and "DeepSpeed ZeRO-3 optimizer holds" in run.output, run.log()
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in run.output, run.log()
    # Rank 1's NaN reaches rank 0 in the reduced gradients: DeepSpeed skips on both, each rank's guards count it.
    assert "[test_fault_injection] grad-nan at step 1" in run.output, run.log()
    assert_deepspeed_skipped_once(run.output, [entry["vlm_dpo/skipped_steps"] for entry in run.step_logs])
    for rank in (0, 1):
        state = json.loads((run.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
        assert state["guards"]["skipped_steps"] == 1, (rank, state["guards"])
    assert len(run.step_logs) == len(ddp.step_logs) == 3, (run.step_logs, ddp.step_logs)
    for mine, theirs in zip(run.step_logs, ddp.step_logs, strict=True):
        for key, within in TOLERANCE.items():
            if math.isfinite(theirs[key]):
                assert mine[key] == pytest.approx(theirs[key], **within), (key, mine, theirs)
            else:
                assert not math.isfinite(mine[key]), (key, mine, theirs)


def test_zero3_with_a_rank_without_images_trains_stock_and_with_the_plugins_as_ddp(tmp_path, llava):
    # Unshuffled, one pair per rank and step: rank 0 gets the rows with images, rank 1 the text-only ones.
    dataset = write_mixed_dataset(tmp_path / "data", rows=8)
    in_order = dict(per_device_train_batch_size=1, disable_shuffling=True, max_steps=2)
    zero3 = dict(deepspeed=zero_file(tmp_path, 3), use_cpu=None, **in_order)
    stock_env = {"VLM_DPO_LLAMAFACTORY": "0", **deepspeed_environment()}
    stock = two_ranks(tmp_path, llava, dataset, "stock", stock_env, "full", **zero3)
    ours = two_ranks(tmp_path, llava, dataset, "zero3", deepspeed_environment(), "full", **zero3)
    ddp = two_ranks(tmp_path, llava, dataset, "ddp", {}, "full", **in_order)
    for run in (stock, ours, ddp):
        assert run.returncode == 0 and "world size: 2" in run.output, run.log()
    # Really ZeRO-3: the Trainer's save says so in both; the plugins read the live optimizer too.
    for run in (stock, ours):
        assert "stage3_gather_16bit_weights_on_model_save=false" in run.output, run.log()
    assert "DeepSpeed ZeRO-3 optimizer holds" in ours.output, ours.log()
    assert STAND_IN_LOGGED not in ours.output, ours.log()
    assert len(stock.step_logs) == len(ours.step_logs) == len(ddp.step_logs) == 2
    for mine, replicated, theirs in zip(ours.step_logs, ddp.step_logs, stock.step_logs, strict=True):
        for key, within in TOLERANCE.items():
            assert mine[key] == pytest.approx(replicated[key], **within), (key, mine, replicated)
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (key, mine, theirs)
