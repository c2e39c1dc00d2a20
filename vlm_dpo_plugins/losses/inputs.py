"""Check and promote what a loss variant receives, with errors that say which field is missing and who fills it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_dpo_plugins.losses.settings import LossConfig
from vlm_dpo_plugins.types import LossInputs, PreferenceLogps

HOW_TO_BUILD = (
    "vlm_dpo_plugins.losses.logprobs.sequence_logps returns summed log-probs with their token counts, "
    "and logprobs.preference_logps fills every field of PreferenceLogps from them"
)


@dataclass(frozen=True)
class VariantInputs:
    """The fields of ``PreferenceLogps`` in the dtype the loss is computed in; absent ones are None."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_token_count: torch.Tensor | None
    rejected_token_count: torch.Tensor | None
    extras: dict[str, torch.Tensor]

    @property
    def has_token_counts(self) -> bool:
        return self.chosen_token_count is not None


def computation_dtype(dtype: torch.dtype, config: LossConfig) -> torch.dtype:
    # At least fp32: a bf16 difference of two summed log-probs near -300 is rounded to a multiple of 2.
    return torch.promote_types(dtype, torch.float32) if config.fp32_logps else dtype


def prepare(
    logps: PreferenceLogps, config: LossConfig, variant: str, needs: LossInputs, *, divides_by_counts: bool = False
) -> VariantInputs:
    """Validate ``logps`` against what ``variant`` needs and return its fields in the computation dtype.

    Token counts are checked to be >= 1 only when the variant divides by them (``divides_by_counts``): an
    empty response is the collation checks' finding to report, warn about or skip, as the user chose.
    """
    _require_present(logps, variant, needs)
    expected_shape = logps.chosen.shape
    named = {
        "rejected": logps.rejected,
        "ref_chosen": logps.ref_chosen,
        "ref_rejected": logps.ref_rejected,
        "chosen_token_count": logps.chosen_token_count,
        "rejected_token_count": logps.rejected_token_count,
        **{f"extras[{key!r}]": value for key, value in logps.extras.items()},
    }
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != expected_shape:
            raise ValueError(
                f"loss {variant!r}: PreferenceLogps.{name} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected_shape)} like PreferenceLogps.chosen (one value per preference pair)"
            )
    dtype = computation_dtype(logps.chosen.dtype, config)

    def promoted(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(dtype)

    chosen_count, rejected_count = _token_counts(logps, variant, divides_by_counts)
    return VariantInputs(
        chosen=logps.chosen.to(dtype),
        rejected=logps.rejected.to(dtype),
        ref_chosen=promoted(logps.ref_chosen),
        ref_rejected=promoted(logps.ref_rejected),
        chosen_token_count=promoted(chosen_count),
        rejected_token_count=promoted(rejected_count),
        extras={key: value.to(dtype) for key, value in logps.extras.items()},
    )


def _require_present(logps: PreferenceLogps, variant: str, needs: LossInputs) -> None:
    if needs.reference and (logps.ref_chosen is None or logps.ref_rejected is None):
        raise ValueError(
            f"loss {variant!r} needs the reference log-probs PreferenceLogps.ref_chosen and .ref_rejected, "
            "but one is None: run the reference model (or the policy with its adapter disabled) on the same "
            f"batch, or choose a reference-free loss.type such as 'simpo'. {HOW_TO_BUILD}."
        )
    if needs.token_counts and (logps.chosen_token_count is None or logps.rejected_token_count is None):
        raise ValueError(
            f"loss {variant!r} needs PreferenceLogps.chosen_token_count and .rejected_token_count (response "
            f"tokens per pair, to length-normalise), but one is None. {HOW_TO_BUILD}."
        )
    missing = [key for key in needs.extras if key not in logps.extras]
    if missing:
        raise ValueError(
            f"loss {variant!r} needs PreferenceLogps.extras{missing} (see docs/losses.md for what each holds); "
            f"extras has {sorted(logps.extras)}"
        )


def _token_counts(
    logps: PreferenceLogps, variant: str, divides_by_counts: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    chosen, rejected = logps.chosen_token_count, logps.rejected_token_count
    if (chosen is None) != (rejected is None):
        given = "chosen_token_count" if chosen is not None else "rejected_token_count"
        raise ValueError(f"loss {variant!r}: PreferenceLogps.{given} is set but not the other count; give both")
    for name, counts in (("chosen_token_count", chosen), ("rejected_token_count", rejected)):
        if divides_by_counts and counts is not None and bool((counts < 1).any()):
            pairs = torch.nonzero(counts < 1).flatten().tolist()
            raise ValueError(
                f"loss {variant!r}: PreferenceLogps.{name} is < 1 for pair(s) {pairs}: a response with no "
                "trainable tokens cannot be length-normalised. The collation checks (response-masked, "
                "response-truncated) report such rows by index; fix their label/response mask or truncation."
            )
    return chosen, rejected
