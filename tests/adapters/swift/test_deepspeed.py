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
import re
from pathlib import Path

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)
pytest.importorskip("deepspeed", reason="needs deepspeed in the ms-swift environment")

from fault_plugin import install as install_fault_plugin  # noqa: E402
from framework_cli import free_port  # noqa: E402

WRITTEN = re.compile(r"zero_optimization\.(\w+): 'auto' -> (\d+)")
LIVE = re.compile(r"DeepSpeed ZeRO-(\d) optimizer holds (.*)$")
DEEPSPEED_DEFAULT = 500_000_000


@pytest.mark.parametrize(
    "stage", [pytest.param(s, marks=pytest.mark.reliability("ms-swift", row=f"zero{s}")) for s in (2, 3)]
)
def test_tuned_buckets_are_what_the_live_optimizer_holds_and_a_nan_is_skipped_once(
    tmp_path, swift_dpo, qwen2_vl, plugin_file, stage
):
    zero = {"stage": stage, "reduce_bucket_size": "auto"}
    zero["allgather_bucket_size" if stage == 2 else "stage3_prefetch_bucket_size"] = "auto"
    deepspeed_config = tmp_path / f"zero{stage}.json"
    deepspeed_config.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                "zero_optimization": zero,
            }
        )
    )
    env = {
        **install_fault_plugin(tmp_path / "plugins", step=1),
        "NPROC_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "vlm-dpo-plugins" / "torch_extensions"),
    }
    extra = ["--tuner_type", "lora", "--fp16", "false", "--bf16", "false", "--deepspeed", str(deepspeed_config)]
    extra += ["--external_plugins", plugin_file]
    run = swift_dpo(qwen2_vl, max_steps=3, extra_args=extra, env_extra=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, run.tail()
    written = {key: int(value) for key, value in WRITTEN.findall(output)}
    expected_keys = {"reduce_bucket_size", "allgather_bucket_size" if stage == 2 else "stage3_prefetch_bucket_size"}
    assert set(written) == expected_keys and max(written.values()) < DEEPSPEED_DEFAULT / 1000, run.tail()
    (live,) = [match for line in output.splitlines() if (match := LIVE.search(line))]
    held = {key: int(value) for key, value in (part.split() for part in live.group(2).split(", "))}
    assert int(live.group(1)) == stage and held == written, (live.group(0), written)
    assert output.count("OVERFLOW! Skipping step") == 1, run.tail()
    assert "skipped by DeepSpeed" in output, run.tail()
    assert [entry["vlm_dpo/skipped_steps"] for entry in run.logged_steps()] == [0, 1, 1], run.logged_steps()
    assert all(math.isfinite(entry["loss"]) for entry in run.logged_steps())
