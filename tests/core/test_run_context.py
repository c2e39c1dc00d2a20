"""The run's facts as the shared step reads them from a framework's ``TrainingArguments``.

Core tests run in all three environments, so each transformers release the frameworks pin is checked here.
"""

from __future__ import annotations

import pytest
import transformers
from packaging.version import Version
from transformers import TrainingArguments

from vlm_dpo_plugins.adapters.hf_trainer.run import run_context

# What TrainingArguments resolves an FSDP config without a version to: 1 in transformers 5.6 (LLaMA-Factory's pin),
# 2 in the later releases the TRL and ms-swift environments pin.
DEFAULT_FSDP_VERSION = 1 if Version(transformers.__version__) < Version("5.7") else 2


def context(**arguments):
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], **arguments)
    return run_context("test", "0", args, uses_peft=False, gradient_checkpointing=False)


@pytest.mark.parametrize(
    "arguments, version",
    [
        ({}, None),
        ({"fsdp": "full_shard"}, DEFAULT_FSDP_VERSION),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, 1),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 2}}, 2),
    ],
)
def test_the_fsdp_version_is_the_one_transformers_resolved(arguments, version):
    facts = context(**arguments)
    assert facts.uses_fsdp is (version is not None)
    assert facts.fsdp_version == version
