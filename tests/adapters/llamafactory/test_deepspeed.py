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
import re
from pathlib import Path

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")
pytest.importorskip("deepspeed", reason="needs deepspeed in the LLaMA-Factory environment")

from fault_plugin import install as install_fault_plugin  # noqa: E402
from llamafactory_runs import TINY_MODELS, dpo_config, run_llamafactory, write_dataset  # noqa: E402

WRITTEN = re.compile(r"zero_optimization\.(\w+): 'auto' -> (\d+)")
LIVE = re.compile(r"DeepSpeed ZeRO-(\d) optimizer holds (.*)$")
DEEPSPEED_DEFAULT = 500_000_000  # what the engine would use for an "auto" nothing filled


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return TINY_MODELS["llava"].build(tmp_path_factory.mktemp("models") / "llava")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_dataset(directory)
    return directory


@pytest.mark.parametrize(
    "stage", [pytest.param(s, marks=pytest.mark.reliability("LLaMA-Factory", row=f"zero{s}")) for s in (2, 3)]
)
def test_tuned_buckets_are_what_the_live_optimizer_holds_and_a_nan_is_skipped_once(tmp_path, llava, dataset, stage):
    zero = {"stage": stage, "reduce_bucket_size": "auto"}
    if stage == 2:
        zero["allgather_bucket_size"] = "auto"
    else:
        zero["stage3_prefetch_bucket_size"] = "auto"
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
        "DS_ACCELERATOR": "cpu",
        # Outside the test's temporary HOME, so DeepSpeed's CPU communication op is compiled once per machine.
        "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "vlm-dpo-plugins" / "torch_extensions"),
    }
    config = dpo_config(TINY_MODELS["llava"], llava, dataset, tmp_path / "out", "lora", deepspeed=str(deepspeed_config))
    run = run_llamafactory(tmp_path, config, env=env, nproc=1)
    assert run.returncode == 0, run.log()
    written = dict((key, int(value)) for key, value in WRITTEN.findall(run.output))
    expected_keys = {"reduce_bucket_size", "allgather_bucket_size" if stage == 2 else "stage3_prefetch_bucket_size"}
    assert set(written) == expected_keys and max(written.values()) < DEEPSPEED_DEFAULT / 1000, run.log()
    (live,) = [match for line in run.output.splitlines() if (match := LIVE.search(line))]
    held = {key: int(value) for key, value in (part.split() for part in live.group(2).split(", "))}
    assert int(live.group(1)) == stage and held == written, (live.group(0), written)
    assert run.output.count("OVERFLOW! Skipping step") == 1, run.log()
    assert "skipped by DeepSpeed" in run.output, run.log()
    assert [entry["vlm_dpo/skipped_steps"] for entry in run.step_logs] == [0.0, 1.0, 1.0], run.step_logs
    assert all(math.isfinite(loss) for loss in run.losses), run.losses
