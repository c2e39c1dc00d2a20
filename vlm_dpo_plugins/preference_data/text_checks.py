"""The collation checks a row's raw text allows, before any tokenizer: the same codes the live checks use."""

from __future__ import annotations

from vlm_dpo_plugins.collation.codes import CHECKS
from vlm_dpo_plugins.preference_data.pairs import IMAGE_PLACEHOLDER, Pair
from vlm_dpo_plugins.types import Finding, Severity


def finding(code: str, message: str, fix: str, row: int, field: str | None) -> Finding:
    # The live "skip" policy drops the row from training; before training that is worth a warning.
    severity = Severity.ERROR if CHECKS[code].default_policy == "error" else Severity.WARNING
    return Finding(code, severity, message, fix, row=row, field=field, source="doctor")


def text_findings(pair: Pair) -> list[Finding]:
    findings = []
    for side in ("chosen", "rejected"):
        text = getattr(pair, side)
        if not text.strip():
            shown = "empty" if not text else f"whitespace only ({text!r})"
            findings.append(
                finding(
                    "empty-response",
                    f"the {side} response is {shown}",
                    "give the row a real response or remove it",
                    pair.row,
                    side,
                )
            )
    if findings:
        return findings + image_marker_findings(pair)
    chosen, rejected = pair.chosen, pair.rejected
    if chosen == rejected:
        findings.append(
            finding(
                "identical-pair",
                f"chosen and rejected are the same text ({chosen[:60]!r}): margin 0, loss ln 2",
                "correct the rejected response (are both columns mapped to the same field?) or remove the row",
                pair.row,
                "rejected",
            )
        )
    elif _normalised(chosen) == _normalised(rejected):
        findings.append(
            finding(
                "near-identical-pair",
                f"the responses differ only in whitespace or letter case ({chosen[:40]!r} vs {rejected[:40]!r})",
                "make the rejected response differ in content, or remove the row",
                pair.row,
                "rejected",
            )
        )
    if chosen[0].isspace() != rejected[0].isspace():
        spaced = "chosen" if chosen[0].isspace() else "rejected"
        other = "rejected" if spaced == "chosen" else "chosen"
        findings.append(
            finding(
                "leading-space-mismatch",
                f"the {spaced} response starts with whitespace and the {other} does not ({chosen[:15]!r} vs "
                f"{rejected[:15]!r}): their first tokens differ for a reason that is not the preference",
                "strip leading whitespace from both responses",
                pair.row,
                spaced,
            )
        )
    return findings + image_marker_findings(pair)


def image_marker_findings(pair: Pair) -> list[Finding]:
    images, markers = len(pair.images), pair.placeholders
    if markers == images or (markers == 0 and not pair.needs_placeholders):
        return []
    if markers == 0:
        why = f"LLaMA-Factory requires one {IMAGE_PLACEHOLDER} per image and fails on the row"
    else:
        why = "the model fails with 'Image features and image tokens do not match'"
    return [
        finding(
            "image-count-mismatch",
            f"the prompt has {markers} image placeholder(s) but the row has {images} image(s): {why}",
            f"put exactly one {IMAGE_PLACEHOLDER} (or image part) in the prompt per image, or fix the image list",
            pair.row,
            "images",
        )
    ]


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()
