"""Every plugin's row and pair checks, as the collation runs them.

The collation runs inside ``vlm_dpo_collate`` and the dataset pre-scan; the checks it runs are those of every
plugin (``vlm_dpo_check_example``, ``vlm_dpo_check_pair``), the built-in ones included. Whoever calls the collation
(``wrapper.HookedCollator``, ``wrapper.scan_dataset``) builds this from the plugin manager and passes it in, so no
plugin holds the manager.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlm_dpo_plugins.errors import PluginError
from vlm_dpo_plugins.types import Finding, TokenizedPair


class PairCheckers:
    def __init__(self, manager: Any) -> None:
        self._manager = manager

    def example(self, example: Mapping[str, Any], row: int) -> list[Finding]:
        """Findings on one raw row, from every plugin's ``vlm_dpo_check_example``."""
        return _flattened("vlm_dpo_check_example", self._manager.hook.vlm_dpo_check_example(example=example, row=row))

    def pair(self, pair: TokenizedPair) -> list[Finding]:
        """Findings on one tokenized pair, from every plugin's ``vlm_dpo_check_pair``."""
        return _flattened("vlm_dpo_check_pair", self._manager.hook.vlm_dpo_check_pair(pair=pair))


def _flattened(hook: str, results: list[Any]) -> list[Finding]:
    findings: list[Finding] = []
    for result in results:
        if result is None:
            continue
        for finding in result:
            if not isinstance(finding, Finding):
                raise PluginError(f"a plugin's {hook} returned {type(finding).__name__} among its findings, not Finding")
            findings.append(finding)
    return findings
