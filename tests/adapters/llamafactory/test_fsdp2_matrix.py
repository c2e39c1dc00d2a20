"""The FSDP2 cells of the model × tuning matrix that ``test_distributed.py`` leaves out, through LLaMA-Factory's own
FSDP2 path on two CPU ranks (the gate opened, as there): LLaVA with LoRA, Qwen2-VL with full tuning.

``test_distributed.py`` runs LLaVA with full tuning (and its resume) and Qwen2-VL with LoRA (and what its
checkpoints hold) in the ``llamafactory`` session. These cells run in the ``fsdp2_matrix`` nox session, the slow
matrix's own (run by hand: CI's run has no room for it; docs/testing.md). Each cell: a NaN loss on rank 1 at step 1
skipped on both ranks and counted in both ranks' checkpointed state; the losses, gradient norms (over all shards)
and margins equal the same run under DDP; the whole model at the end, gathered from the shards
(``tests/support/full_weights_plugin.py``), equals DDP's, with the vision tower and projector (and, with LoRA, the
base language model) exactly as loaded.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

from fault_matrix import assert_one_rank_fault_skipped_on_both  # noqa: E402
from fault_plugin import install as install_fault_plugin  # noqa: E402
from framework_cli import merged_environments  # noqa: E402
from fsdp_on_cpu import gate_env  # noqa: E402
from full_weights_plugin import install as install_full_weights  # noqa: E402
from llamafactory_runs import FSDP2_SETTINGS, TINY_MODELS, dpo_config, run_llamafactory, write_dataset  # noqa: E402
from saved_models import assert_same_weights, live_weights, without_adapters  # noqa: E402

pytestmark = pytest.mark.fsdp2_matrix

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_dataset(directory, num_rows=8)
    return directory


@pytest.mark.parametrize("family, tuning", [("llava", "lora"), ("qwen2_vl", "full")])
def test_fsdp2_cell_trains_as_ddp_and_skips_a_one_rank_nan_on_both(tmp_path, tiny_model_dir, dataset, family, tuning):
    import torch

    model, model_dir = TINY_MODELS[family], tiny_model_dir(family)
    fault = install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=1)

    def two_ranks(name: str, env: dict, **overrides):
        env = install_full_weights(tmp_path / f"weights-{name}", tmp_path / f"{name}.pt", env)
        config = dpo_config(
            model, model_dir, dataset, tmp_path / name, tuning,
            max_steps=3, save_strategy="steps", save_steps=3, **overrides,
        )  # fmt: skip
        run = run_llamafactory(tmp_path / f"cli-{name}", config, env=env, nproc=2)
        assert run.returncode == 0 and "world size: 2" in run.output, run.log()
        assert "[test_fault_injection] loss-nan at step 1" in run.output, run.log()
        assert_one_rank_fault_skipped_on_both(run.output)
        for rank in (0, 1):
            state = json.loads((run.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
            assert state["guards"]["skipped_steps"] == 1, (name, rank, state["guards"])
        return run

    sharded = two_ranks("fsdp2", merged_environments(gate_env(tmp_path / "gate"), fault), **FSDP2_SETTINGS[family])
    ddp = two_ranks("ddp", fault)
    assert "fsdp_version=2" in sharded.output and "fsdp_version=None" in ddp.output, sharded.log()
    assert (sharded.output_dir / "checkpoint-3" / "pytorch_model_fsdp_0").is_dir(), "not an FSDP2 checkpoint"
    for mine, theirs in zip(sharded.step_logs, ddp.step_logs, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            if not math.isnan(theirs[key]):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (key, mine, theirs)

    final, reference = torch.load(tmp_path / "fsdp2.pt"), torch.load(tmp_path / "ddp.pt")
    assert_same_weights(final, reference)
    initial = live_weights(model_dir)
    weights = without_adapters(final) if tuning == "lora" else final
    assert weights.keys() == initial.keys(), sorted(weights.keys() ^ initial.keys())[:10]
    held = [name for name in initial if tuning == "lora" or model.part(name) != "language"]
    assert {model.part(name) for name in held} >= {"vision", "projector"}
    for name in held:
        assert weights[name].equal(initial[name]), name
    trained = [name for name in final if ".lora_B." in name] if tuning == "lora" else [
        name for name in initial if model.part(name) == "language"
    ]  # fmt: skip
    assert trained and any(not final[name].equal(initial.get(name, torch.zeros_like(final[name]))) for name in trained)
