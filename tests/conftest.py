"""Shared test setup: everything runs offline, and only the plugins a test registers take part."""

from __future__ import annotations

import os

# Set before transformers/huggingface_hub are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import json  # noqa: E402

import pytest  # noqa: E402

RELIABILITY_RESULTS = "VLM_DPO_RELIABILITY_RESULTS"
"""A JSON-lines file: where the ``reliability`` nox session collects the fault table's cells from real runs."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    marker = item.get_closest_marker("reliability")
    path = os.environ.get(RELIABILITY_RESULTS)
    if marker is not None and path and (report.when == "call" or report.outcome != "passed"):
        params = getattr(getattr(item, "callspec", None), "params", {})
        cell = {
            "framework": marker.args[0],
            "row": marker.kwargs.get("row") or params["fault"],
            "outcome": report.outcome,
            "test": item.nodeid,
        }
        with open(path, "a", encoding="utf-8") as results:
            results.write(json.dumps(cell) + "\n")
    return report
