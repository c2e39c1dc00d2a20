"""Settings of the pair checks (config section ``collation``)."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_dpo_plugins.validation import require


@dataclass
class CollationConfig:
    check_pairs: bool = True
    min_response_tokens: int = 1

    def __post_init__(self) -> None:
        require(self.min_response_tokens >= 1, "min_response_tokens", self.min_response_tokens, "an integer >= 1")
