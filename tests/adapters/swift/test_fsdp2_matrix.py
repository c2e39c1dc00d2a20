"""The FSDP2 cell of the model × tuning matrix that the ``swift`` session leaves out, through
``swift rlhf --fsdp fsdp2`` on two CPU ranks (accelerate's gate opened, as in ``test_distributed.py``): Qwen2-VL with
LoRA.

The ``swift`` and ``reliability`` sessions run Qwen2-VL with full tuning (a NaN skipped, the resume), LLaVA with
LoRA (a NaN skipped, what the checkpoints hold) and LLaVA with full tuning (a rank without images,
``test_mixed_ranks.py``). This cell runs in the ``fsdp2_matrix`` nox session, the slow matrix's own (run by hand:
CI's run has no room for it; docs/testing.md): a NaN loss on rank 1 at step 1 skipped on both ranks and counted in
both ranks' checkpointed state; the losses, gradient norms (over all shards) and margins equal the same run under
DDP; the whole model at the end, gathered from the shards (``tests/support/full_weights_plugin.py``), equals DDP's,
the adapters trained and the base model, vision tower and merger exactly as loaded.
"""

from __future__ import annotations

import json
import math

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)

import yaml  # noqa: E402
from fault_matrix import assert_one_rank_fault_skipped_on_both  # noqa: E402
from fault_plugin import install as install_fault_plugin  # noqa: E402
from framework_cli import free_port, merged_environments  # noqa: E402
from fsdp_on_cpu import gate_env  # noqa: E402
from full_weights_plugin import install as install_full_weights  # noqa: E402

pytestmark = pytest.mark.fsdp2_matrix

TWO_RANKS = ["--use_cpu", "true", "--save_steps", "3", "--save_only_model", "false", "--fp16", "false"]


def test_qwen2_vl_with_lora_under_fsdp2_trains_as_ddp_and_skips_a_one_rank_nan_on_both(
    tmp_path, swift_dpo, qwen2_vl, plugin_file
):
    import torch
    from saved_models import assert_same_weights, live_weights, without_adapters

    model = qwen2_vl
    model_dir = model.build(tmp_path / "model")
    config = tmp_path / "vlm_dpo.yaml"
    config.write_text(yaml.safe_dump({"loss": {"type": "sigmoid"}}))  # the plugins compute the loss: one to poison
    fault = install_fault_plugin(tmp_path / "plugins", fault="loss-nan", steps=[1], only_rank=1)
    fault["VLM_DPO_CONFIG"] = str(config)

    def two_ranks(name, env, *extra):
        env = install_full_weights(tmp_path / f"weights-{name}", tmp_path / f"{name}.pt", env)
        env = {**env, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
        arguments = ["--tuner_type", "lora", *TWO_RANKS, "--external_plugins", plugin_file, *extra]
        run = swift_dpo(
            model, num_rows=8, max_steps=3, extra_args=arguments, env_extra=env, output_name=name, model_dir=model_dir
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0 and "world_size: 2" in output, run.tail()
        assert "[test_fault_injection] loss-nan at step 1" in output, run.tail()
        assert_one_rank_fault_skipped_on_both(output)
        for rank in (0, 1):
            state = json.loads((run.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
            assert state["guards"]["skipped_steps"] == 1, (name, rank, state["guards"])
        return run

    sharded = two_ranks("fsdp2", merged_environments(gate_env(tmp_path / "gate"), fault), "--fsdp", "fsdp2")
    ddp = two_ranks("ddp", fault)
    assert "fsdp_version=2" in sharded.stdout + sharded.stderr, sharded.tail()
    assert (sharded.output_dir / "checkpoint-3" / "pytorch_model_fsdp_0").is_dir(), "not an FSDP2 checkpoint"
    for mine, theirs in zip(sharded.logged_steps(), ddp.logged_steps(), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            if not math.isnan(theirs[key]):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (key, mine, theirs)

    final, reference = torch.load(tmp_path / "fsdp2.pt"), torch.load(tmp_path / "ddp.pt")
    assert_same_weights(final, reference)
    initial = live_weights(model_dir)
    base = without_adapters(final)
    assert base.keys() == initial.keys(), sorted(base.keys() ^ initial.keys())[:10]
    assert {model.part(name) for name in base} == {"vision", "aligner", "language"}
    for name, tensor in initial.items():
        assert base[name].equal(tensor), name
    adapters = [name for name in final if ".lora_B." in name]
    assert adapters and all(final[name].abs().max() > 0 for name in adapters)
