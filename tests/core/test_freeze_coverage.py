"""Every architecture in transformers' image-text-to-text mapping, built on the meta device, is classified.

Models are built from their default config under ``torch.device("meta")`` with weight
initialisation switched off: no memory, no weights, a fraction of a second each. The
mapping differs between transformers versions; what the installed one has is what
is checked, and architectures whose default config cannot even be built are listed.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field

import pytest
import torch

from vlm_dpo_plugins.freeze.classify import Classification, classify_names, vision_blocks
from vlm_dpo_plugins.freeze.lora import PATCH_EMBEDDING, lora_target_modules

transformers = pytest.importorskip("transformers")

# The architectures the issue names; Pixtral ships as the vision encoder of mistral3.
REQUIRED = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
    "paligemma",
    "mllama",
    "internvl",
    "mistral3",
    "aria",
)

# The stack whose last block a "vision_blocks: K" stage unfreezes first, per required architecture.
LAST_VISION_STACK = {
    "llava": r"vision_tower(?:\.vision_model)?\.encoder\.layers",
    "llava_next": r"vision_tower(?:\.vision_model)?\.encoder\.layers",
    "llava_onevision": r"vision_tower(?:\.vision_model)?\.encoder\.layers",
    "qwen2_vl": r"visual\.blocks",
    "qwen2_5_vl": r"visual\.blocks",
    "qwen3_vl": r"visual\.blocks",
    "idefics3": r"vision_model\.encoder\.layers",
    "smolvlm": r"vision_model\.encoder\.layers",
    "gemma3": r"vision_tower(?:\.vision_model)?\.encoder\.layers",
    "paligemma": r"vision_tower(?:\.vision_model)?\.encoder\.layers",
    "mllama": r"vision_model\.global_transformer\.layers",
    "internvl": r"vision_tower\.encoder\.layer",
    "mistral3": r"vision_tower\.transformer\.layers",
    "aria": r"vision_tower(?:\.vision_model)?\.encoder\.layers",
}


@dataclass
class Surveyed:
    names: list[str]
    classification: Classification
    lora_frozen_vision: dict[str, str]  # target -> module class, with only the language model trainable
    lora_everything: dict[str, str]  # target -> module class, with every group trainable
    last_vision_block: list[str]


@dataclass
class Survey:
    version: str
    mapping: dict[str, str]
    built: dict[str, Surveyed] = field(default_factory=dict)
    unbuildable: dict[str, str] = field(default_factory=dict)
    repaired: dict[str, str] = field(default_factory=dict)

    def fully_classified(self) -> list[str]:
        return [model_type for model_type, record in self.built.items() if not record.classification.unmatched]

    def coverage(self) -> str:
        line = (
            f"{len(self.fully_classified())} of {len(self.mapping)} architectures fully classified "
            f"(transformers {self.version}; {len(self.built)} built on the meta device)"
        )
        if self.unbuildable:
            line += f"; {len(self.unbuildable)} cannot be built from their default config: " + "; ".join(
                f"{model_type} ({error})" for model_type, error in self.unbuildable.items()
            )
        if self.repaired:
            line += "; built after a repair of the default config: " + "; ".join(
                f"{model_type} ({note})" for model_type, note in self.repaired.items()
            )
        return line


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layouts: initialisation on meta tensors is slower, not wrong
        return contextlib.nullcontext()
    return no_init_weights()


def _repair_pad_token_ids(config) -> str:
    """Some default configs carry a pad token id outside their own vocabulary (Idefics3 in transformers 5.6)."""
    notes = []
    for sub in [config, *(getattr(config, key) for key in config.sub_configs if getattr(config, key, None))]:
        pad, vocab = getattr(sub, "pad_token_id", None), getattr(sub, "vocab_size", None)
        if isinstance(pad, int) and isinstance(vocab, int) and pad >= vocab:
            sub.pad_token_id = None
            notes.append(f"{type(sub).__name__}.pad_token_id {pad} >= vocab_size {vocab}")
    return ", ".join(notes)


def _build(model_type: str, class_name: str):
    config = transformers.AutoConfig.for_model(model_type)
    repair = ""
    for attempt in range(2):
        try:
            with torch.device("meta"), _no_init_weights():
                try:
                    return transformers.AutoModelForImageTextToText.from_config(config), repair
                except ValueError as error:
                    if "Unrecognized configuration class" not in str(error):
                        raise
                    return getattr(transformers, class_name)._from_config(config), repair
        except Exception:
            repair = _repair_pad_token_ids(config) if attempt == 0 else ""
            if not repair:
                raise
    raise AssertionError("unreachable")


def _survey_one(model, model_type: str) -> Surveyed:
    names = [name for name, _ in model.named_parameters()]
    classification = classify_names(names, model_type)
    groups = classification.groups
    lora_frozen_vision, lora_everything = {}, {}
    if model_type in REQUIRED:  # LoRA targets are checked there only; walking every model's modules costs seconds
        modules = dict(model.named_modules())
        lora_frozen_vision = {t: type(modules[t]).__name__ for t in lora_target_modules(model, groups["language"])}
        lora_everything = {t: type(modules[t]).__name__ for t in lora_target_modules(model, names)}
    blocks = vision_blocks(groups["vision"], model_type)
    return Surveyed(
        names=names,
        classification=classification,
        lora_frozen_vision=lora_frozen_vision,
        lora_everything=lora_everything,
        last_vision_block=blocks[-1] if blocks else [],
    )


@pytest.fixture(scope="module")
def survey() -> Survey:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    result = Survey(version=transformers.__version__, mapping=dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for model_type, class_name in result.mapping.items():
                try:
                    model, repair = _build(model_type, class_name)
                except Exception as error:  # noqa: BLE001 - any failure of a default config is listed, not raised
                    first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
                    result.unbuildable[model_type] = f"{type(error).__name__}: {first_line[:120]}"
                    continue
                if repair:
                    result.repaired[model_type] = repair
                result.built[model_type] = _survey_one(model, model_type)
                del model
    finally:
        transformers.logging.set_verbosity(verbosity)
    return result


def test_every_parameter_of_every_buildable_architecture_is_classified(survey):
    coverage = survey.coverage()
    print(f"\n{coverage}")
    problems = []
    for model_type, record in survey.built.items():
        groups = record.classification.groups
        placed = sorted(name for members in groups.values() for name in members)
        if placed != sorted(record.names):
            problems.append(f"{model_type}: parameters not in exactly one group")
        if record.classification.unmatched:
            problems.append(
                f"{model_type}: {len(record.classification.unmatched)} unclassified, "
                f"e.g. {list(record.classification.unmatched[:3])}"
            )
        if not groups["language"]:
            problems.append(f"{model_type}: no language parameters")
    assert survey.built, coverage
    assert not problems, coverage + "\n" + "\n".join(problems)


def _required(survey: Survey, model_type: str) -> Surveyed:
    if model_type not in survey.mapping:
        pytest.skip(f"{model_type} is not in transformers {survey.version}'s image-text-to-text mapping")
    if model_type in survey.unbuildable:
        pytest.skip(f"{model_type} cannot be built from its default config: {survey.unbuildable[model_type]}")
    return survey.built[model_type]


@pytest.mark.parametrize("model_type", REQUIRED)
def test_required_architecture_is_split_by_its_registry_row(survey, model_type):
    record = _required(survey, model_type)
    groups = record.classification.groups
    sizes = {group: len(members) for group, members in groups.items()}
    assert groups["vision"] and groups["projector"] and groups["language"], sizes
    assert groups["other"] == [], groups["other"][:5]
    assert record.classification.generic == (), "names the registry row misses: " + str(
        record.classification.generic[:5]
    )


@pytest.mark.parametrize("model_type", REQUIRED)
def test_lora_targets_of_required_architecture_are_language_linears_only(survey, model_type):
    record = _required(survey, model_type)
    groups = record.classification.groups
    language = set(groups["language"])
    targets = record.lora_frozen_vision
    assert targets, "no LoRA target in the language model"
    assert all(f"{target}.weight" in language for target in targets)
    assert set(targets.values()) <= {"Linear"}, set(targets.values())

    everything = record.lora_everything
    in_vision = [t for t in everything if f"{t}.weight" in set(groups["vision"])]
    assert in_vision, "with every group trainable the vision tower's linears are targets too"
    assert not any(PATCH_EMBEDDING.match(part) for target in everything for part in target.split("."))
    assert set(everything.values()) <= {"Linear"}, set(everything.values())


@pytest.mark.parametrize("model_type", REQUIRED)
def test_last_vision_block_of_required_architecture_is_the_top_of_its_last_stack(survey, model_type):
    record = _required(survey, model_type)
    block = record.last_vision_block
    assert block, "no numbered vision blocks found"
    match = re.search(rf"(.*(?:{LAST_VISION_STACK[model_type]}))\.(\d+)\.", block[0])
    assert match, f"last block {block[0]!r} is not in a {LAST_VISION_STACK[model_type]} stack"
    stack, index = match.group(1), int(match.group(2))
    indices = {int(m.group(1)) for name in record.names if (m := re.match(rf"{re.escape(stack)}\.(\d+)\.", name))}
    assert index == max(indices)
    assert all(name.startswith(f"{stack}.{index}.") for name in block)
