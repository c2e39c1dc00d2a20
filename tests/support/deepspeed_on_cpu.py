"""DeepSpeed's communication on the gloo group of CPU ranks: what keeps a framework's multi-rank ZeRO-3 off a CPU.

On accelerator ranks accelerate initialises ``deepspeed.comm`` itself when the run uses DeepSpeed (``PartialState``:
``if not cpu ...: dist.init_distributed(...)``). With ``use_cpu`` it does not: transformers hands it ``cpu=True``
and never says DeepSpeed (``TrainingArguments._setup_devices``, the ``use_cpu`` branch before the ``deepspeed``
one), so accelerate starts torch's gloo group and ``deepspeed.comm`` stays empty. ZeRO-2 does not mind, since
``deepspeed.initialize`` adopts the group. ZeRO-3 does: the model loads under ``deepspeed.zero.Init``, whose config
asks ``deepspeed.comm`` for the world size before initialising it, is told nothing and counts one rank, and the batch
check refuses ("4 != 2 * 1 * 1"). Without ``use_cpu`` LLaMA-Factory's transformers 5.6 and accelerate 1.11 run
ZeRO on CPU ranks as on GPUs, but ms-swift's accelerate 1.16 makes a CPU rank distributed only with ``cpu=True``
and counts one process where DeepSpeed counts two ("2 != 2 * 1 * 2"): under ms-swift no stock setting runs a
two-rank ZeRO-3 on CPU.

``open_gate()`` does on a CPU rank what accelerate does on an accelerator: when transformers learns that the run
uses DeepSpeed (its ``HfDeepSpeedConfig`` is built, in ``TrainingArguments``, after accelerate's group and before
the model loads), ``deepspeed.comm`` is initialised on the gloo group accelerate started (DeepSpeed adopts an
initialised torch group; no second group, no other setting). Nothing after it changes: the framework's ZeRO-3 model
loading, ``deepspeed.initialize``, the Trainer's loop and its checkpoints run as they run on GPUs, over gloo.
Tests import it in their rank processes; on a GPU nothing needs it.
"""

from __future__ import annotations

import functools


def open_gate() -> None:
    from transformers.integrations import deepspeed as hf_deepspeed

    stock_init = hf_deepspeed.HfDeepSpeedConfig.__init__
    if getattr(stock_init, "opens_deepspeed_on_cpu", False):
        return

    @functools.wraps(stock_init)
    def init(self, *args, **kwargs):
        stock_init(self, *args, **kwargs)
        import torch.distributed

        if not torch.distributed.is_initialized() or torch.distributed.get_backend() != "gloo":
            return
        from deepspeed import comm

        if not comm.is_initialized():
            comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    init.opens_deepspeed_on_cpu = True
    hf_deepspeed.HfDeepSpeedConfig.__init__ = init


def gate_env(folder) -> dict[str, str]:
    """Environment for a framework's CLI whose processes (torchrun's ranks too) open the gate at start-up."""
    from framework_cli import gate_opened_at_startup

    return gate_opened_at_startup(folder, "deepspeed_on_cpu")
