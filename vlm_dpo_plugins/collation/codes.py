"""The collation checks by name, with the policy each one has unless the config says otherwise.

Defaults follow what the problem costs: a pair that can only train at ln 2, a
broken mask or a batch the model will crash on is an ``error`` (the pre-scan
surfaces these before step 0); a row whose response was cut away entirely gives
no signal, so it is skipped; cosmetic or possibly intended differences warn.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    default_policy: str
    summary: str


CHECKS: dict[str, Check] = {
    "identical-pair": Check("error", "chosen and rejected responses are token-identical (margin 0, loss ln 2)"),
    "near-identical-pair": Check("warn", "responses differ only in whitespace or letter case"),
    "empty-response": Check("error", "a response is empty or whitespace-only (only special tokens train)"),
    "response-masked": Check("error", "the label/completion mask covers the whole response on a side"),
    "response-truncated": Check("skip", "truncation to max_length removed the whole response on a side"),
    "prompt-unmasked": Check("warn", "the mask trains on the prompt too (no prompt token is masked)"),
    "prompt-mismatch": Check("error", "chosen and rejected rows carry different prompt tokens"),
    "leading-space-mismatch": Check("warn", "one response starts with whitespace and the other does not"),
    "special-token-misplaced": Check("warn", "a BOS after position 0, a BOS in the response, or several EOS in it"),
    "image-count-mismatch": Check("error", "image placeholder runs or image tokens do not match the row's images"),
    "image-tokens-truncated": Check(
        "error", "truncation cut image tokens (the 'Image features and image tokens do not match' crash)"
    ),
    "image-unreadable": Check("error", "an image of the raw row is missing or cannot be opened"),
    "malformed-row": Check(
        "error", "the raw row is no preference pair (a field missing, a wrong role, a line not UTF-8 or JSON)"
    ),
    "collate-failed": Check("error", "the framework's collator raised on this row"),
    "row-too-long": Check("skip", "the encoded row is longer than max_length and the framework deletes such rows"),
}
