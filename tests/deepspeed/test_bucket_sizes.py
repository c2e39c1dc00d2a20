"""The bucket-size rule, checked against values worked out by hand for real model shapes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlm_dpo_plugins.guards.deepspeed_buckets import bucket_memory_ceiling, deepspeed_bucket_sizes, model_hidden_size

# 1 GiB / (4.5 buffers x 2 bytes) = 1073741824 / 9 = 119304647.1, down to even: 119304646; in fp32, / 18 =
# 59652323.6, down to even: 59652322.
BF16_CEILING = 119_304_646
FP32_CEILING = 59_652_322


def test_memory_ceiling_follows_the_gradient_dtype():
    assert bucket_memory_ceiling("bf16") == BF16_CEILING
    assert bucket_memory_ceiling("fp16") == BF16_CEILING
    assert bucket_memory_ceiling("fp32") == FP32_CEILING


@pytest.mark.parametrize(
    ("case", "arguments", "expected"),
    [
        (
            "LLaVA-1.5-7B full, ZeRO-2, 8 ranks: one 4096 x 4096 matrix per bucket",
            dict(trainable_parameters=6_700_000_000, hidden_size=4096, zero_stage=2, world_size=8),
            {"reduce_bucket_size": 16_777_216, "allgather_bucket_size": 16_777_216},
        ),
        (
            "Qwen2-VL-2B, ZeRO-2, 8 ranks: 1536^2 = 2359296 is raised to 8 ranks x 1e6",
            dict(trainable_parameters=1_500_000_000, hidden_size=1536, zero_stage=2, world_size=8),
            {"reduce_bucket_size": 8_000_000, "allgather_bucket_size": 8_000_000},
        ),
        (
            "ZeRO-1 reads the same two keys",
            dict(trainable_parameters=6_700_000_000, hidden_size=4096, zero_stage=1, world_size=1),
            {"reduce_bucket_size": 16_777_216, "allgather_bucket_size": 16_777_216},
        ),
        (
            "LoRA on a 7B model: 4M trainable parameters cap the 16.8M bucket",
            dict(trainable_parameters=4_000_000, hidden_size=4096, zero_stage=2, world_size=8),
            {"reduce_bucket_size": 4_000_000, "allgather_bucket_size": 4_000_000},
        ),
        (
            "Qwen2-VL-7B, ZeRO-3, 8 ranks: 3584^2 = 12845056; 0.9 x that = 11560550.4; 10 x 3584",
            dict(trainable_parameters=7_600_000_000, hidden_size=3584, zero_stage=3, world_size=8),
            {
                "reduce_bucket_size": 12_845_056,
                "stage3_prefetch_bucket_size": 11_560_550,
                "stage3_param_persistence_threshold": 35_840,
            },
        ),
        (
            "72B, ZeRO-3, 64 ranks: 8192^2 = 67108864 beats the 64e6 rank floor; 0.9 x that = 60397977.6",
            dict(trainable_parameters=72_000_000_000, hidden_size=8192, zero_stage=3, world_size=64),
            {
                "reduce_bucket_size": 67_108_864,
                "stage3_prefetch_bucket_size": 60_397_977,
                "stage3_param_persistence_threshold": 81_920,
            },
        ),
        (
            "256 ranks: the 256e6 rank floor would exceed the bf16 memory ceiling, and the ceiling wins",
            dict(trainable_parameters=72_000_000_000, hidden_size=8192, zero_stage=2, world_size=256),
            {"reduce_bucket_size": BF16_CEILING, "allgather_bucket_size": BF16_CEILING},
        ),
        (
            "the same in fp32: 4-byte gradients halve the ceiling",
            dict(trainable_parameters=72_000_000_000, hidden_size=8192, zero_stage=2, world_size=256, dtype="fp32"),
            {"reduce_bucket_size": FP32_CEILING, "allgather_bucket_size": FP32_CEILING},
        ),
        (
            "a 16384-wide model at ZeRO-3: 16384^2 = 268435456 and 0.9 x that are both capped",
            dict(trainable_parameters=400_000_000_000, hidden_size=16384, zero_stage=3, world_size=8),
            {
                "reduce_bucket_size": BF16_CEILING,
                "stage3_prefetch_bucket_size": BF16_CEILING,
                "stage3_param_persistence_threshold": 163_840,
            },
        ),
        (
            "a tiny test model: the 1e6 floor is capped by its 33736 parameters",
            dict(trainable_parameters=33_736, hidden_size=64, zero_stage=2, world_size=1),
            {"reduce_bucket_size": 33_736, "allgather_bucket_size": 33_736},
        ),
        (
            "an odd parameter count is rounded up to even: DeepSpeed asserts allgather_bucket_size % 2 == 0",
            dict(trainable_parameters=33_737, hidden_size=64, zero_stage=1, world_size=1),
            {"reduce_bucket_size": 33_738, "allgather_bucket_size": 33_738},
        ),
        (
            "an odd width: 1001^2 = 1002001 is above the 1e6 floor and rounded up to even",
            dict(trainable_parameters=10**9, hidden_size=1001, zero_stage=2, world_size=1),
            {"reduce_bucket_size": 1_002_002, "allgather_bucket_size": 1_002_002},
        ),
        ("ZeRO off: no buckets", dict(trainable_parameters=10**9, hidden_size=2048, zero_stage=0), {}),
    ],
)
def test_bucket_table(case, arguments, expected):
    assert deepspeed_bucket_sizes(**arguments) == expected, case


def test_buckets_are_far_below_deepspeeds_default_for_a_7b_vlm():
    sizes = deepspeed_bucket_sizes(6_700_000_000, 4096, zero_stage=2, world_size=8)
    # DeepSpeed's 5e8 default with overlap: 4.5 x 5e8 x 2 bytes = 4.5 GB per bucket kind; here 151 MB.
    assert 4.5 * sizes["reduce_bucket_size"] * 2 == pytest.approx(150_994_944)
    assert sizes["reduce_bucket_size"] * 29 < 5e8


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(zero_stage=4), "zero_stage is 4; expected 0, 1, 2 or 3"),
        (dict(dtype="int8"), "dtype is 'int8'; expected one of ['bf16', 'fp16', 'fp32']"),
        (dict(hidden_size=0), "hidden_size is 0; expected an integer >= 1"),
        (dict(trainable_parameters=0), "trainable_parameters is 0; expected an integer >= 1"),
        (dict(world_size=2.0), "world_size is 2.0; expected an integer >= 1"),
    ],
)
def test_bad_arguments_name_the_argument(arguments, message):
    call = dict(trainable_parameters=10**9, hidden_size=2048, zero_stage=2, world_size=1, dtype="bf16") | arguments
    with pytest.raises(ValueError) as error:
        deepspeed_bucket_sizes(**call)
    assert str(error.value) == message


def test_hidden_size_is_the_widest_of_the_config_and_its_text_and_vision_parts():
    llava_like = SimpleNamespace(
        text_config=SimpleNamespace(hidden_size=4096), vision_config=SimpleNamespace(hidden_size=1024)
    )
    assert model_hidden_size(llava_like) == 4096
    assert model_hidden_size(SimpleNamespace(hidden_size=896)) == 896
    assert model_hidden_size(SimpleNamespace(text_config=None)) is None


def test_hidden_size_of_real_transformers_vlm_configs():
    transformers = pytest.importorskip("transformers")
    llava = transformers.LlavaConfig(
        text_config={"model_type": "llama", "hidden_size": 4096},
        vision_config={"model_type": "clip_vision_model", "hidden_size": 1024, "num_attention_heads": 16},
    )
    assert model_hidden_size(llava) == 4096
    # SmolVLM-256M's shape: a 576-wide language model behind a 768-wide SigLIP; the wider one sizes the buckets.
    idefics3 = transformers.Idefics3Config(text_config={"hidden_size": 576}, vision_config={"hidden_size": 768})
    assert model_hidden_size(idefics3) == 768
