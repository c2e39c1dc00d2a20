"""A rank whose batches hold no image, under ZeRO-3 and FSDP2, through ``swift rlhf`` on two CPU ranks (gloo).

Under ZeRO-3 and FSDP2 running a module gathers its weights from every rank: a collective. ms-swift's LLaVA template
(``llava1_5_hf``) hands a text-only batch to the model as it is, and the model skips the vision tower, while the
rank whose batch has images runs it: the ranks' collectives stop matching. Over gloo the run aborts ("Received data
size doesn't match expected size. Is there a distributed collective mismatch in your code?"); over NCCL it hangs,
which is the report for Qwen2.5-VL and Qwen3-VL. (ms-swift's Qwen2-VL-family templates encode a 32×32 black image
for a text-only batch themselves, ``Template._get_inputs_embeds_hf``, so there every rank already runs the vision
tower; the two-rank ZeRO-3 test of ``test_deepspeed_ranks.py`` trains Qwen2-VL.)

The data alternates a pair with an image and a text-only pair, one pair per rank and step, unshuffled: rank 0's
batches always hold an image, rank 1's never do. Full tuning, the default freeze policy (vision tower and
projector frozen, still gathered under ZeRO-3 and FSDP2), fp32.

- Stock, under ZeRO-3 (``--deepspeed``, DeepSpeed's communication opened on the gloo group:
  ``tests/support/deepspeed_on_cpu.py``) and under FSDP2 (``--fsdp fsdp2``, accelerate's CPU gate:
  ``tests/support/fsdp_on_cpu.py``): the run fails with gloo's mismatch, or is still running when the timeout
  kills it (the NCCL hang).
- With the plugins, the same two runs train: the rank without images encodes a stand-in image at zero weight (the
  shared step's vision lockstep, ``vlm_dpo_plugins/guards/vision_lockstep.py``; logged once). The losses, gradient
  norms and margins, and every weight at the end (gathered from the shards by ``tests/support/full_weights_plugin.py``),
  equal the same run under DDP, which gathers nothing and needs no lockstep; the vision tower and projector end as
  loaded.
"""

from __future__ import annotations

import json

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)
pytest.importorskip("deepspeed", reason="needs deepspeed in the ms-swift environment")

import deepspeed_on_cpu  # noqa: E402
import fsdp_on_cpu  # noqa: E402
from fault_matrix import deepspeed_environment, zero_config  # noqa: E402
from framework_cli import free_port, merged_environments  # noqa: E402
from full_weights_plugin import install as install_full_weights  # noqa: E402

COLLECTIVE_MISMATCH = "Is there a distributed collective mismatch in your code?"
STAND_IN_LOGGED = "vlm-dpo: guards: a rank's batch has no image while another's has"
SWIFT_IMAGE_TAG = "<image>"
ROWS = 8
STEPS = 2
# Over gloo stock aborts within seconds; over NCCL it would hang, which this bounds.
STOCK_TIMEOUT = 180
# One pair per rank and step, in file order: rank 0 gets the rows with images, rank 1 the text-only ones.
IN_FILE_ORDER = [
    "--per_device_train_batch_size", "1", "--dataset_shuffle", "false", "--train_dataloader_shuffle", "false",
]  # fmt: skip
# transformers refuses ``--save_only_model true`` under swift's FSDP2 (SHARDED_STATE_DICT), even with nothing saved.
TWO_RANKS = [
    "--tuner_type", "full", "--use_cpu", "true", "--fp16", "false", "--bf16", "false", "--save_only_model", "false",
    *IN_FILE_ORDER,
]  # fmt: skip
# A margin is beta times a difference of four log-probs of some 40 nats, each rounded to about 3e-6 in fp32: where
# ZeRO-3 and FSDP2 sum the gradients in another order than DDP, the margins agree to about 1e-6, not 1e-7.
TOLERANCE = {
    "loss": dict(rel=1e-5, abs=1e-7),
    "grad_norm": dict(rel=1e-5, abs=1e-7),
    "rewards/margins": dict(rel=1e-5, abs=1e-6),
}


def write_mixed_dataset(path):
    """Swift's RLHF rows, alternating a pair with an image and a text-only pair."""
    from vlm_dpo_plugins.tiny.data import make_preference_examples, write_preference_images

    path.parent.mkdir(parents=True, exist_ok=True)
    examples = make_preference_examples(ROWS, seed=0)
    images = write_preference_images(examples, path.parent / "images")
    with path.open("w") as handle:
        for index, (example, image) in enumerate(zip(examples, images, strict=True)):
            text_only = index % 2 == 1
            prompt = "Name a shape." if text_only else f"{SWIFT_IMAGE_TAG}{example.prompt}"
            row = {
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": example.chosen}],
                "rejected_response": example.rejected,
                "images": [] if text_only else [str(image.resolve())],
            }
            handle.write(json.dumps(row) + "\n")
    return path


def engine(name: str, folder) -> tuple[list[str], dict[str, str]]:
    """The command-line flags and environment that run ``name`` on these CPU ranks."""
    if name == "zero3":
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "zero3.json"
        config.write_text(json.dumps(zero_config(3)))
        environment = merged_environments(deepspeed_on_cpu.gate_env(folder), deepspeed_environment())
        return ["--deepspeed", str(config)], environment
    if name == "fsdp2":
        return ["--fsdp", "fsdp2"], fsdp_on_cpu.gate_env(folder)
    assert name == "ddp", name
    return [], {}


@pytest.mark.reliability("ms-swift", row="zero3-no-image")
def test_stock_breaks_on_a_rank_without_images_under_zero3_and_fsdp2_and_the_plugins_train_it_as_ddp(
    tmp_path, swift_dpo, llava, plugin_file
):
    import torch
    from saved_models import assert_same_weights, live_weights

    model_dir = llava.build(tmp_path / "model")
    dataset = write_mixed_dataset(tmp_path / "data" / "train.jsonl")

    def launch(engine_name: str, plugins: bool):
        name = f"{engine_name}-{'plugins' if plugins else 'stock'}"
        flags, env = engine(engine_name, tmp_path / f"{name}-engine")
        extra = [*TWO_RANKS, *flags, "--save_strategy", "no"]
        if plugins:
            extra += ["--external_plugins", plugin_file]
            env = install_full_weights(tmp_path / f"{name}-weights", tmp_path / f"{name}.pt", env)
        env = {**env, "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
        return swift_dpo(
            llava, max_steps=STEPS, extra_args=extra, env_extra=env, timeout=STOCK_TIMEOUT if not plugins else 300,
            output_name=name, dataset=dataset, model_dir=model_dir,
        )  # fmt: skip

    ddp = launch("ddp", plugins=True)
    output = ddp.stdout + ddp.stderr
    assert ddp.returncode == 0 and "world_size: 2" in output and STAND_IN_LOGGED not in output, ddp.tail()
    ddp_weights = torch.load(tmp_path / "ddp-plugins.pt")
    initial = live_weights(model_dir)
    assert ddp_weights.keys() == initial.keys(), sorted(set(ddp_weights) ^ set(initial))[:10]
    frozen = [name for name in initial if llava.part(name) in ("vision", "aligner")]
    assert frozen and any(not ddp_weights[name].equal(initial[name]) for name in initial if name not in frozen)

    for engine_name in ("zero3", "fsdp2"):
        stock = launch(engine_name, plugins=False)
        assert stock.returncode != 0 or stock.timed_out, (engine_name, stock.tail())
        assert stock.timed_out or COLLECTIVE_MISMATCH in stock.stdout + stock.stderr, (engine_name, stock.tail())

        ours = launch(engine_name, plugins=True)
        output = ours.stdout + ours.stderr
        assert ours.returncode == 0 and "world_size: 2" in output, (engine_name, ours.tail())
        # The engine really ran: the plugins saw it.
        seen = "deepspeed_stage=3" if engine_name == "zero3" else "fsdp_version=2"
        assert output.count(seen) == 2, (engine_name, ours.tail())
        assert STAND_IN_LOGGED in output, (engine_name, ours.tail())
        logged, reference = ours.logged_steps(), ddp.logged_steps()
        assert len(logged) == len(reference) == STEPS, (logged, reference)
        for mine, theirs in zip(logged, reference, strict=True):
            for key, within in TOLERANCE.items():
                assert mine[key] == pytest.approx(theirs[key], **within), (engine_name, key, mine, theirs)
        weights = torch.load(tmp_path / f"{engine_name}-plugins.pt")
        assert_same_weights(weights, ddp_weights, label=engine_name)
        for name in frozen:
            assert weights[name].equal(initial[name]), (engine_name, name)
