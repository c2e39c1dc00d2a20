"""One rank of the two-process ZeRO-2 bf16 test: the NaN gradient appears on rank 0 only.

Run by test_two_ranks.py as a plain script, one process per rank (RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in the environment); prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from vlm_dpo_plugins.guards.deepspeed_skips import DeepSpeedStepSkips  # noqa: E402

CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "steps_per_print": 10**9,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": True},
}


def main() -> None:
    rank = int(os.environ["RANK"])
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=CONFIG)
    skips = DeepSpeedStepSkips(engine)
    steps = []
    for poison in (False, True, False):
        inputs = torch.randn(2, 16, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
        handle = None
        if poison and rank == 0:
            handle = engine.module[2].weight.register_hook(
                lambda grad: grad.index_fill(0, torch.tensor([0]), float("nan"))
            )
        before = [parameter.detach().clone() for parameter in engine.module.parameters()]
        engine.backward(engine(inputs).float().pow(2).mean())
        engine.step()
        if handle is not None:
            handle.remove()
        changed = any(not torch.equal(old, new) for old, new in zip(before, engine.module.parameters()))
        steps.append({"skipped": skips.skipped_since_last_check(), "weights_changed": changed})
    weights = [parameter.detach().double() for parameter in engine.module.parameters()]
    result = {
        "rank": rank,
        "steps": steps,
        "finite": all(bool(torch.isfinite(weight).all()) for weight in weights),
        "checksum": sum(float(weight.sum()) for weight in weights),
    }
    print("RESULT " + json.dumps(result), flush=True)
    deepspeed.comm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
