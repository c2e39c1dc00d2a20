"""``llamafactory-cli train`` with a DeepSpeed ZeRO-2 / ZeRO-3 config, through LLaMA-Factory's own DeepSpeed path.

LLaMA-Factory launches DeepSpeed only through torchrun (``FORCE_TORCHRUN``), here with one CPU worker
(``DS_ACCELERATOR=cpu``, gloo). The config leaves the bucket sizes ``auto``, as transformers' examples write
them: the adapter fills them for the model, and the live ZeRO optimizer must hold exactly those sizes (read
back from the engine and logged). A NaN gradient at step 1 is skipped once: by DeepSpeed, whose own overflow
check sees it first, with the guards counting that skip and not stepping again.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")
pytest.importorskip("deepspeed", reason="needs deepspeed in the LLaMA-Factory environment")

from fault_matrix import (  # noqa: E402,E501
    assert_deepspeed_skipped_once,
    assert_live_buckets_as_written,
    deepspeed_environment,
    zero_config,
)
from fault_plugin import install as install_fault_plugin  # noqa: E402
from llamafactory_runs import (  # noqa: E402
    TINY_MODELS,
    assert_projector_trains_from,
    dpo_config,
    projector_weights,
    run_llamafactory,
)


@pytest.mark.parametrize(
    "stage", [pytest.param(s, marks=pytest.mark.reliability("LLaMA-Factory", row=f"zero{s}")) for s in (2, 3)]
)
def test_tuned_buckets_are_what_the_live_optimizer_holds_and_a_nan_is_skipped_once(
    tmp_path, llava, tiny_dataset_dir, stage
):
    deepspeed_config = tmp_path / f"zero{stage}.json"
    deepspeed_config.write_text(json.dumps(zero_config(stage)))
    env = {**install_fault_plugin(tmp_path / "plugins", step=1), **deepspeed_environment()}
    config = dpo_config(
        TINY_MODELS["llava"], llava, tiny_dataset_dir, tmp_path / "out", "lora", deepspeed=str(deepspeed_config)
    )
    run = run_llamafactory(tmp_path, config, env=env, nproc=1)
    assert run.returncode == 0, run.log()
    assert_live_buckets_as_written(run.output, stage)
    assert_deepspeed_skipped_once(run.output, [entry["vlm_dpo/skipped_steps"] for entry in run.step_logs])
    assert all(math.isfinite(loss) for loss in run.losses), run.losses


def test_an_unfreeze_stage_under_zero2_trains_the_projector_from_its_step_and_resumes_at_it(
    tmp_path, llava, tiny_dataset_dir
):
    """ZeRO partitions the optimizer when DeepSpeed starts: the projector's stage is in it from step 0, inert, and
    trains from its step (docs/scaling.md; the two-rank comparison with DDP is tests/sharded/test_unfreeze_stages.py,
    and through LLaMA-Factory test_distributed.py's unfreeze test). A run resumed from the checkpoint just before the
    stage starts it as the uninterrupted run did.
    """
    import shutil

    import torch

    deepspeed_config = tmp_path / "zero2.json"
    deepspeed_config.write_text(json.dumps(zero_config(2)))
    section = {"freeze": {"unfreeze": [{"at_step": 2, "groups": ["projector"]}]}}

    def train(output_dir, name, resume=False):
        config = dpo_config(
            TINY_MODELS["llava"], llava, tiny_dataset_dir, output_dir, "full", deepspeed=str(deepspeed_config),
            max_steps=3, save_strategy="steps", save_steps=1, vlm_dpo=section,
            overwrite_output_dir=None if resume else True,
        )  # fmt: skip
        run = run_llamafactory(tmp_path, config, env=deepspeed_environment(), nproc=1, name=name)
        assert run.returncode == 0, run.log()
        assert "vlm-dpo: step 2: unfroze" in run.output and "staged group(s)" in run.output, run.log()
        return run

    run = train(tmp_path / "out", "uninterrupted")

    saved = assert_projector_trains_from(2, llava, run.output_dir, last_step=3)

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(run.output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = train(resumed_dir, "resumed", resume=True)
    assert "checkpoint-2" in resumed.output, resumed.log()
    # The log carries the checkpoint's history, then the resumed step.
    assert [entry["loss"] for entry in resumed.step_logs] == pytest.approx([e["loss"] for e in run.step_logs], abs=1e-6)
    after = projector_weights(resumed_dir / "checkpoint-3" / "model.safetensors")
    assert after.keys() == saved[3].keys()
    assert all(torch.allclose(after[name], saved[3][name], rtol=0, atol=1e-6) for name in after), "resumed otherwise"
