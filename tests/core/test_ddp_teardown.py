"""The DDP wrapper is freed when ``train()`` returns, while its process group is alive (``hf_trainer/ddp_teardown.py``).

The two-rank crash at exit (``terminate called without an active exception``) came from the teardown order: the
plugin trainer sits in reference cycles, so without the release its DDP wrapper, whose Reducer holds the gloo
process group, outlived the framework's training function and was collected at interpreter shutdown, after
``destroy_process_group()``. These tests check the order itself, not the rare abort: on two gloo ranks, a wrapper
held by a trainer in a cycle outlives the trainer, and after ``release_ddp_wrapper`` it is gone at once; and the
plugin trainer's ``train()`` releases it whether training returned or raised. The two-rank framework runs check
the same at interpreter exit (``tests/support/exit_check_plugin.py``). After a completed ``train()`` the process
group is destroyed by an ``atexit`` handler, before interpreter shutdown, for a framework that leaves it alive
(ms-swift); a process whose training raised registers nothing.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
from rank_workers import ddp_teardown_on_two_ranks, results_on_two_ranks


@pytest.fixture(scope="module")
def ranks():
    return results_on_two_ranks(ddp_teardown_on_two_ranks)


def test_a_trainer_in_a_reference_cycle_keeps_its_ddp_wrapper_alive_after_it_is_dropped(ranks):
    assert [ranks[rank]["outlives_the_trainer"] for rank in (0, 1)] == [True, True]


def test_the_release_frees_the_ddp_wrapper_at_once_and_leaves_the_unwrapped_model(ranks):
    for rank in (0, 1):
        outcome = ranks[rank]
        assert outcome["released"] and outcome["freed"], outcome
        assert outcome["model_wrapped_is_model"] and outcome["accelerator_models_unwrapped"] == [True], outcome
        assert outcome["released_again"] is False, outcome


def test_without_a_ddp_wrapper_nothing_changes():
    from vlm_dpo_plugins.adapters.hf_trainer.ddp_teardown import release_ddp_wrapper

    model = object()
    trainer = SimpleNamespace(model=model, model_wrapped=model, accelerator=SimpleNamespace(_models=[model]))
    assert release_ddp_wrapper(trainer) is False
    assert trainer.model_wrapped is model and trainer.accelerator._models == [model]


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
def test_the_plugin_trainer_releases_the_wrapper_when_train_returns_or_raises(tmp_path, monkeypatch, fails):
    pytest.importorskip("transformers")
    from vlm_dpo_plugins.adapters.hf_trainer import plugin_trainer

    class FrameworkTrainer:
        def train(self, resume_from_checkpoint=None, *args, **kwargs):
            self.trained = True
            if fails:
                raise RuntimeError("training failed")
            return "train output"

    class Trainer(plugin_trainer.PluginTrainerMixin, FrameworkTrainer):
        def __init__(self):
            self.args = SimpleNamespace(output_dir=str(tmp_path))

        def vlm_dpo_prescan(self):
            pass

    calls = []
    monkeypatch.setattr(
        plugin_trainer, "release_ddp_wrapper", lambda trainer: calls.append(("release", trainer.trained))
    )
    monkeypatch.setattr(plugin_trainer, "tear_down_before_interpreter_exit", lambda: calls.append(("at exit", True)))
    trainer = Trainer()
    if fails:
        with pytest.raises(RuntimeError, match="training failed"):
            trainer.train()
        # A rank whose training raised never waits at exit on a process group that may have work in flight.
        assert calls == [("release", True)]
    else:
        assert trainer.train() == "train output"
        assert calls == [("release", True), ("at exit", True)]  # after the framework's train() ran, once each


EXIT_SCRIPT = """
import atexit, os, sys
import torch.distributed as dist
from vlm_dpo_plugins.adapters.hf_trainer import ddp_teardown

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
# Registered first, so it runs last: what the process group looks like once the teardown handler ran.
atexit.register(lambda: print("initialized at the end of exit:", dist.is_initialized(), flush=True))
if sys.argv[2] == "register":
    ddp_teardown.tear_down_before_interpreter_exit()
    ddp_teardown.tear_down_before_interpreter_exit()  # once per process
print("main done", flush=True)
"""


@pytest.mark.parametrize("register", [True, False], ids=["after-train", "without"])
def test_after_a_completed_train_the_process_group_is_destroyed_before_interpreter_shutdown(tmp_path, register):
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    argument = "register" if register else "no"
    command = [sys.executable, str(script), str(port), argument]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-2:] == ["main done", f"initialized at the end of exit: {not register}"], run.stdout
