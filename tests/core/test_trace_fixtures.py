"""The stored traces (tests/support/traces.py): exact on a machine kind they were recorded on, within a stated
tolerance and said so on another, and recording one machine kind keeps the others."""

from __future__ import annotations

import json
import math

import pytest
import traces

STEPS = [{"loss": 0.6931471824645996, "grad_norm": 0.41145938634872437, "logps/chosen": -36.39617919921875}]


@pytest.fixture
def trace_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(traces, "TRACE_DIR", tmp_path)
    return tmp_path


def store(trace_dir, *recordings):
    (trace_dir / "run.json").write_text(json.dumps({"recordings": list(recordings)}))


def recording(machine, steps=STEPS, weights="w"):
    return {"machine": machine, "steps": steps, "weights_sha256": weights}


def nudged(steps, key, relative):
    return [{**step, key: step[key] * (1 + relative)} for step in steps]


def test_on_a_recorded_machine_kind_one_ulp_fails(trace_dir):
    store(trace_dir, recording(None), recording(traces.machine_kind()))
    traces.check_trace("run", STEPS, "w")
    one_ulp = [{**STEPS[0], "loss": math.nextafter(STEPS[0]["loss"], 1.0)}]
    with pytest.raises(AssertionError, match="step entry 0 differs"):
        traces.check_trace("run", one_ulp, "w")
    with pytest.raises(AssertionError, match="trained weights differ"):
        traces.check_trace("run", STEPS, "other weights")


def test_a_legacy_recording_reproduced_exactly_passes_without_a_warning(trace_dir, recwarn):
    store(trace_dir, recording(None))
    traces.check_trace("run", STEPS, "w")
    assert not [w for w in recwarn if issubclass(w.category, traces.OtherMachineTrace)]


def test_on_another_machine_kind_the_tolerance_applies_and_is_said(trace_dir):
    store(trace_dir, recording("another kind"))
    with pytest.warns(traces.OtherMachineTrace, match="no recording from this machine kind"):
        traces.check_trace("run", nudged(STEPS, "logps/chosen", 1e-6), "different weights")
    with pytest.raises(AssertionError, match="logps/chosen"):
        traces.check_trace("run", nudged(STEPS, "logps/chosen", 1e-3), "w")


def test_follows_trace_uses_this_machine_kinds_recording_when_there_is_one(trace_dir):
    store(trace_dir, recording("another kind", nudged(STEPS, "grad_norm", 1e-4)), recording(traces.machine_kind()))
    assert traces.follows_trace("run", nudged(STEPS, "grad_norm", 1e-6), tolerance=1e-5) < 1e-5
    with pytest.raises(AssertionError, match="grad_norm"):
        traces.follows_trace("run", nudged(STEPS, "grad_norm", 1e-3), tolerance=1e-5)


def test_recording_replaces_this_machine_kinds_entry_and_keeps_the_others(trace_dir, monkeypatch):
    store(trace_dir, recording(None), recording(traces.machine_kind(), weights="old"))
    monkeypatch.setenv(traces.RECORD_VARIABLE, "1")
    traces.check_trace("run", STEPS, "new")
    stored = json.loads((trace_dir / "run.json").read_text())["recordings"]
    assert [(r["machine"], r["weights_sha256"]) for r in stored] == [(None, "w"), (traces.machine_kind(), "new")]
