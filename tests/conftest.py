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


MODEL_RESULTS = "VLM_DPO_MODEL_RESULTS"
"""A JSON-lines file: where each framework's session collects the cells of docs/models.md from real runs."""
FAMILY_PARAMETERS = ("model", "architecture", "model_name", "family")
"""Test parameters that name the model family, for a ``model_support`` mark without ``family``."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" or report.outcome != "passed":
        params = getattr(getattr(item, "callspec", None), "params", {})
        marker = item.get_closest_marker("reliability")
        if marker is not None and os.environ.get(RELIABILITY_RESULTS):
            row = marker.kwargs.get("row") or params["fault"]
            _record(RELIABILITY_RESULTS, {"framework": marker.args[0], "row": row}, report, item)
        for marker in item.iter_markers("model_support"):
            if os.environ.get(MODEL_RESULTS):
                family = marker.kwargs.get("family") or next(params[key] for key in FAMILY_PARAMETERS if key in params)
                cell = {"framework": marker.args[0], "feature": marker.args[1], "family": family}
                _record(MODEL_RESULTS, cell, report, item)
    return report


def _record(variable: str, cell: dict, report, item) -> None:
    with open(os.environ[variable], "a", encoding="utf-8") as results:
        results.write(json.dumps({**cell, "outcome": report.outcome, "test": item.nodeid}) + "\n")
