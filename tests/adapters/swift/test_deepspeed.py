"""``swift rlhf --deepspeed CONFIG`` (ZeRO-2 / ZeRO-3), through ms-swift's own DeepSpeed path, on one CPU worker.

swift launches the worker with torchrun (``NPROC_PER_NODE=1``; ``DS_ACCELERATOR=cpu``, gloo). The config leaves
the bucket sizes ``auto``, as transformers' examples write them: the adapter fills them for the model, and the
live ZeRO optimizer must hold exactly those sizes (read back from the engine and logged). A NaN gradient at step
1 is skipped once: by DeepSpeed, whose own overflow check sees it first, with the guards counting that skip and
not stepping again.
"""

from __future__ import annotations

import json
import math

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)
pytest.importorskip("deepspeed", reason="needs deepspeed in the ms-swift environment")

from fault_matrix import (  # noqa: E402
    assert_deepspeed_skipped_once,
    assert_live_buckets_as_written,
    deepspeed_environment,
    zero_config,
)
from fault_plugin import install as install_fault_plugin  # noqa: E402
from framework_cli import free_port  # noqa: E402


@pytest.mark.parametrize(
    "stage", [pytest.param(s, marks=pytest.mark.reliability("ms-swift", row=f"zero{s}")) for s in (2, 3)]
)
def test_tuned_buckets_are_what_the_live_optimizer_holds_and_a_nan_is_skipped_once(
    tmp_path, swift_dpo, qwen2_vl, plugin_file, stage
):
    deepspeed_config = tmp_path / f"zero{stage}.json"
    deepspeed_config.write_text(json.dumps(zero_config(stage)))
    env = {
        **install_fault_plugin(tmp_path / "plugins", step=1),
        **deepspeed_environment(),
        "NPROC_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
    }
    extra = ["--tuner_type", "lora", "--fp16", "false", "--bf16", "false", "--deepspeed", str(deepspeed_config)]
    run = swift_dpo(qwen2_vl, max_steps=3, extra_args=[*extra, "--external_plugins", plugin_file], env_extra=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, run.tail()
    assert_live_buckets_as_written(output, stage)
    assert_deepspeed_skipped_once(output, [entry["vlm_dpo/skipped_steps"] for entry in run.logged_steps()])
    assert all(math.isfinite(entry["loss"]) for entry in run.logged_steps())
