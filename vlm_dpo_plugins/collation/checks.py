"""The checks themselves: pure functions from a tokenized pair (or a raw row) to findings.

Each finding names the row, the field, what was seen and the fix. Severity here
is the check's own default; the plugin restates it after applying the policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import compress, groupby
from pathlib import Path
from typing import Any

from vlm_dpo_plugins.collation.codes import CHECKS
from vlm_dpo_plugins.preference_data.images import inspect, locate
from vlm_dpo_plugins.shown import shown
from vlm_dpo_plugins.types import Finding, Severity, TokenizedPair, TokenizedSequence

SIDES = ("chosen", "rejected")


def finding(code: str, message: str, fix: str, row: int, field: str) -> Finding:
    severity = Severity.ERROR if CHECKS[code].default_policy == "error" else Severity.WARNING
    return Finding(code=code, severity=severity, message=message, fix=fix, row=row, field=field, source="collation")


def check_pair(pair: TokenizedPair) -> list[Finding]:
    findings: list[Finding] = []
    responses = {}
    for name in SIDES:
        side: TokenizedSequence = getattr(pair, name)
        responses[name] = list(compress(side.input_ids, side.response_mask))
        image_findings = _image_findings(pair, name, side)
        # A prompt cut inside its images has lost its response too; one finding names the cause and the fix.
        if not (image_findings and image_findings[0].code == "image-tokens-truncated"):
            findings += _mask_findings(pair, name, side, responses[name])
        findings += _special_token_findings(pair, name, side, responses[name])
        findings += image_findings
    if responses["chosen"] and responses["rejected"]:
        findings += _similarity_findings(pair, responses["chosen"], responses["rejected"])
        findings += _prompt_findings(pair)
    return findings


def _prompt_findings(pair: TokenizedPair) -> list[Finding]:
    """The tokens before each response must be the same prompt: a framework that renders chosen and rejected as two
    conversations (ms-swift) takes the template's word for it, and a template that rewrites the prompt per response
    makes DPO compare answers to two different questions, silently."""
    prompts = []
    for side in (pair.chosen, pair.rejected):
        first_trained = side.response_mask.index(1)
        if first_trained == 0:
            return []  # the mask trains the prompt too: no boundary to compare at (prompt-unmasked says so)
        prompts.append(side.input_ids[:first_trained])
    chosen, rejected = prompts
    if chosen == rejected:
        return []
    at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    return [finding(
        "prompt-mismatch",
        f"the chosen and rejected rows carry different prompts ({len(chosen)} and {len(rejected)} tokens, first "
        f"different at token {at}): DPO would compare answers to two different inputs",
        "render both responses after the same prompt: a chat template that rewrites the conversation per response "
        "(e.g. keeps or drops a thinking block) or a per-response system prompt must be fixed in the template or data",
        pair.row, "prompt",
    )]


def _mask_findings(pair: TokenizedPair, name: str, side: TokenizedSequence, response: list[int]) -> list[Finding]:
    length = len(side.input_ids)
    if not response:
        if pair.max_length is not None and length >= pair.max_length:
            return [finding(
                "response-truncated",
                f"the {name} sequence fills max_length={pair.max_length} with prompt tokens; no response token is left",
                "raise max_length, shorten the prompt or lower the image resolution; the row gives no training signal",
                pair.row, name,
            )]
        return [finding(
            "response-masked",
            f"no token of the {name} response is trained: the completion/label mask is 0 on all {length} tokens",
            "build the mask from the prompt length (prompt 0, response 1); labels must not be -100 on the response",
            pair.row, name,
        )]
    findings = []
    if side.response_mask[0]:
        findings.append(finding(
            "prompt-unmasked",
            f"the {name} mask trains on the prompt too: {len(response)} of {length} tokens are trained, "
            "starting at position 0",
            "mask the prompt (completion_mask 0 / labels -100 up to the response); length-normalised losses "
            "and the NLL term of RPO otherwise learn the prompt",
            pair.row, name,
        ))
    special = pair.special.all
    has_content = any(token not in special for token in response)
    if not has_content or (side.text is not None and not side.text.strip()):
        shown = "empty" if not has_content or not side.text else f"whitespace only ({side.text!r})"
        findings.append(finding(
            "empty-response",
            f"the {name} response is {shown}; only special tokens would be trained",
            "remove the row or give it a real response",
            pair.row, name,
        ))
    return findings


def _similarity_findings(pair: TokenizedPair, chosen: list[int], rejected: list[int]) -> list[Finding]:
    if chosen == rejected:
        limit = pair.max_length
        if limit is not None and max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) >= limit:
            return [finding(
                "response-truncated",
                f"truncation to max_length={limit} left the same first {len(chosen)} response tokens on both "
                "sides, so the DPO margin is 0 and the loss sits at ln 2",
                "raise max_length so the responses keep the tokens where they differ, or shorten the prompt",
                pair.row, "rejected",
            )]
        return [finding(
            "identical-pair",
            f"chosen and rejected responses are token-identical ({len(chosen)} tokens), so the DPO margin "
            "is 0 and the loss sits at ln 2",
            "remove the row or correct its rejected response",
            pair.row, "rejected",
        )]
    chosen_text, rejected_text = pair.chosen.text, pair.rejected.text
    if chosen_text is None or rejected_text is None:
        return []
    findings = []
    if _normalised(chosen_text) == _normalised(rejected_text):
        findings.append(finding(
            "near-identical-pair",
            f"the responses differ only in whitespace or letter case ({chosen_text[:60]!r} vs {rejected_text[:60]!r})",
            "make the rejected response differ in content, or remove the row",
            pair.row, "rejected",
        ))
    if chosen_text and rejected_text and chosen_text[0].isspace() != rejected_text[0].isspace():
        spaced = "chosen" if chosen_text[0].isspace() else "rejected"
        other = "rejected" if spaced == "chosen" else "chosen"
        findings.append(finding(
            "leading-space-mismatch",
            f"the {spaced} response starts with whitespace and the {other} does not "
            f"({chosen_text[:20]!r} vs {rejected_text[:20]!r}), so their first tokens differ for no reason",
            "strip leading whitespace from both responses (or let the chat template add the separator)",
            pair.row, other,
        ))
    return findings


def _special_token_findings(
    pair: TokenizedPair, name: str, side: TokenizedSequence, response: list[int]
) -> list[Finding]:
    special = pair.special
    findings = []
    if special.bos is not None and special.bos not in (special.eos, special.pad):
        # The start is the first token after any leading image tokens (PaliGemma writes <image>... <bos> prompt).
        start = 0
        while special.image is not None and start < len(side.input_ids) and side.input_ids[start] == special.image:
            start += 1
        try:
            position = side.input_ids.index(special.bos, start + 1)
        except ValueError:
            position = None
        if position is not None:
            where = "in the response" if side.response_mask[position] else "in the prompt"
            findings.append(finding(
                "special-token-misplaced",
                f"the {name} sequence has a BOS token at position {position} ({where}), not only at the start",
                "tokenize with add_special_tokens=False after applying a chat template that already adds BOS, "
                "and never tokenize the response with special tokens",
                pair.row, name,
            ))
    if special.eos is not None and response.count(special.eos) > 1:
        findings.append(finding(
            "special-token-misplaced",
            f"the {name} response has {response.count(special.eos)} EOS tokens; the chat template and the "
            "tokenizer both appended one",
            "append EOS once: either in the template or with add_special_tokens, not both",
            pair.row, name,
        ))
    return findings


def _image_findings(pair: TokenizedPair, name: str, side: TokenizedSequence) -> list[Finding]:
    image = pair.special.image
    if image is None:
        return []
    ids = side.input_ids
    runs = _image_runs(ids, image)
    images = pair.num_images
    if not runs and not images:
        return []
    present = sum(runs)
    needed = sum(pair.image_tokens) if pair.image_tokens is not None else None
    ends_in_image = bool(ids) and ids[-1] == image
    cut = ends_in_image or (pair.max_length is not None and len(ids) >= pair.max_length)
    if cut and (present < needed if needed is not None else ends_in_image):
        need = f"; its {images} image(s) need {needed}" if needed is not None else ""
        length = f"above {len(ids) - present + needed}" if needed is not None else ""
        return [finding(
            "image-tokens-truncated",
            f"the {name} sequence was cut inside its image tokens at {len(ids)} tokens: {present} image tokens "
            f"remain{need}; the model fails with 'Image features and image tokens do not match'",
            f"raise max_length {length} plus the rest of this row's prompt and response, or lower the image "
            "resolution (e.g. max_pixels) so the prompt fits",
            pair.row, name,
        )]
    if images is None:
        return []
    if needed is not None:
        matches = present == needed and _runs_hold_images(runs, pair.image_tokens)
    else:
        # Without per-image counts a run may hold several adjacent images, and some models tile one image into
        # several runs: only images without any image token, or image tokens without images, are certain.
        matches = bool(runs) == (images > 0)
    if matches:
        return []
    need = f" needing {needed} image tokens" if needed is not None else ""
    return [finding(
        "image-count-mismatch",
        f"the {name} sequence has {len(runs)} image placeholder run(s) with {present} image tokens, but the row "
        f"has {images} image(s){need}",
        "put exactly one image placeholder in the prompt per image of the row (the template's image token), "
        "or fix the row's image list",
        pair.row, name,
    )]


def _image_runs(ids: list[int], image: int) -> list[int]:
    """Lengths of the runs of image tokens, scanning only the span from the first to the last image token."""
    try:
        first = ids.index(image)
    except ValueError:
        return []
    last = len(ids) - ids[::-1].index(image)
    return [len(list(group)) for token, group in groupby(ids[first:last]) if token == image]


def _runs_hold_images(runs: list[int], needs: tuple[int, ...]) -> bool:
    """Whether the runs, in order, are made of whole images (adjacent images may share one run)."""
    pending = list(needs)
    for run in runs:
        total = 0
        while pending and total < run:
            total += pending.pop(0)
        if total != run:
            return False
    return not pending


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


# ---------------------------------------------------------------------------
# raw rows
# ---------------------------------------------------------------------------


def check_example_images(example: Mapping[str, Any], row: int, verify: bool = True) -> list[Finding]:
    """Missing or unreadable images of a raw row (``images`` list or single ``image``: paths, bytes, dicts, PIL).

    The same check the file checks and ``vlm-dpo doctor`` run; relative paths start from the working
    directory, where the framework that hands over the row opens them.
    """
    if "images" in example:
        images = example["images"]
        if images is None:
            return []
        if isinstance(images, (str, bytes, Mapping)) or not isinstance(images, Sequence):
            # A string would otherwise be checked letter by letter, and a number fails to iterate.
            return [finding(
                "image-unreadable",
                f"'images' is a {type(images).__name__} ({shown(images)}); expected a list of images",
                "give 'images' as a list (of paths, {'path'}/{'bytes'} entries or images), or drop the row",
                row, "images",
            )]
        items = [(f"images[{index}]", item) for index, item in enumerate(images)]
    elif "image" in example:
        items = [("image", example["image"])]
    else:
        return []
    findings = []
    for field, item in items:
        problem = inspect(locate(item, (Path.cwd(),)), verify=verify).problem
        if problem:
            findings.append(finding(
                "image-unreadable",
                problem,
                "fix the path (relative paths resolve against the working directory) or replace the file, "
                "or drop the row",
                row, field,
            ))
    return findings
