"""The one-shot GPU check (benchmarks/gpu_adapter_check.py) runs on CPU and can fail.

A borrowed GPU runs it once, so its code path is exercised here first: ``--cpu-smoke`` runs every
adapter case CPU against CPU (also without pydantic, as on the bare GPU image), and the
comparison is shown to reject damaged results.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_adapter_check as check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_adapter_check.py"
# Runs the script as __main__, optionally with pydantic hidden (the bare GPU image has none).
LAUNCHER = """
import runpy, sys
if sys.argv[1] == "no-pydantic":
    sys.modules["pydantic"] = None
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("pydantic", ["pydantic", "no-pydantic"])
def test_cpu_smoke_passes_every_section(tmp_path, pydantic):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, pydantic, str(SCRIPT), "--cpu-smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    statuses = {name: section["status"] for name, section in report["sections"].items()}
    assert statuses == {"env": "ok", "adapter_bfloat16": "ok", "adapter_float16": "ok",
                        "triton": "skipped"}  # --cpu-smoke never runs the kernels
    assert report["ok"] is True and report["failures"] == []
    expected_cases = {f"{c}/{m}" for c in check.CONFIGS for m in check.MODES}
    for name in ("adapter_bfloat16", "adapter_float16"):
        cases = report["sections"][name]["cases"]
        assert set(cases) == expected_cases
        for case in cases.values():
            assert case["ok"] and case["holes"] > 0
            assert all(layer["kept_positions_identical"] for layer in case["layers"])
    if pydantic == "no-pydantic":
        assert "stand-in" in report["sections"]["env"]["core_config"]


@pytest.fixture(scope="module", params=["h2o", "lookm_full_pivotal"])
def cpu_run(request):
    """One CPU run, without a merge (kept rows are exact copies) and with one (rows may differ
    by float ties up to ``MAX_TIE_FRACTION``, which rounds down to 0 at smoke sizes)."""
    inputs = check.make_inputs(check.SMOKE_SHAPES["bfloat16"], check.MODES["one_shot"],
                               torch.bfloat16, check.CONFIGS[request.param])
    return inputs, check.run_request(inputs, "cpu")


def _damaged(result: check.RunResult, inputs, damage: str) -> check.RunResult:
    caches = [cache.clone() for cache in result.caches]
    block_size = inputs.shape.block_size
    if damage == "kept_entry":  # one element of one kept row of layer 0
        slot = int(result.slots[0][0, 0])
        caches[0][int(inputs.block_row[slot // block_size]), 0, slot % block_size, 0] += 1.0
    elif damage == "hole_block":  # a stale entry of a freed block, which nothing may write
        caches[0][int(inputs.block_row[result.holes[-1]]), 0, 0, 0] += 1.0
    elif damage == "holes":
        return dataclasses.replace(result, holes=result.holes[:-1])
    return dataclasses.replace(result, caches=caches)


def test_identical_runs_compare_equal(cpu_run):
    inputs, result = cpu_run
    record = check.compare_runs(result, result, inputs)
    assert record["ok"], record["problems"]
    assert record["layers"][0]["max_abs_diff"] == 0.0


@pytest.mark.parametrize("damage", ["kept_entry", "hole_block", "holes"])
def test_damaged_run_is_detected(cpu_run, damage):
    inputs, result = cpu_run
    record = check.compare_runs(_damaged(result, inputs, damage), result, inputs)
    assert not record["ok"] and record["problems"], record
    if damage == "kept_entry":
        assert record["layers"][0]["rows_out_of_tolerance"] == 1
        assert record["layers"][0]["max_abs_diff"] >= 0.5


def test_gpu_scoring_benchmark_cpu_smoke(tmp_path):
    """benchmarks/gpu_scoring.py's code path (Triton through its interpreter on tiny sizes): every
    section runs without error and the core rows name their kernel explicitly (no environment
    override, no patched functions)."""
    out = tmp_path / "gpu_scoring.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_scoring.py"),
                           "--cpu-smoke", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    timings = [v for k, v in report["sections"].items() if k.startswith("timings_")]
    assert timings
    for section in timings:
        for merge in ("pivotal", "average", "weighted"):
            assert section[f"compress_{merge}_torch"]["median_ms"] > 0
            assert section[f"compress_{merge}_triton"]["median_ms"] > 0


def test_config_stand_in_matches_the_real_config(monkeypatch):
    """The bare GPU image's stand-in for ``CompressionConfig`` (benchmarks/gpu_scoring.py) has
    every field of the real one with the same defaults, so a field added to the config cannot
    break the one-shot GPU check unnoticed (as ``max_kv_tokens`` once did)."""
    from benchmarks import gpu_scoring
    from lookm_vllm.core import CompressionConfig

    # The stand-in registers itself as lookm_vllm.core.config; put the real module back after.
    name = "lookm_vllm.core.config"
    monkeypatch.setitem(sys.modules, name, sys.modules[name])
    stand_in = gpu_scoring.install_config_stub()
    fields = {field.name for field in dataclasses.fields(stand_in)}
    assert fields == set(CompressionConfig.model_fields)
    for method in ("lookm", "h2o", "snapkv", "streaming", "random"):
        real, fake = CompressionConfig(method=method), stand_in(method=method)
        assert fake.model_dump() == real.model_dump(), method
        assert (fake.is_active, fake.needs_attention) == (real.is_active, real.needs_attention)
    capped_real = CompressionConfig(max_kv_tokens=64)
    capped_fake = stand_in(max_kv_tokens=64)
    assert capped_fake.model_dump() == capped_real.model_dump()
    assert capped_fake.is_active and capped_real.is_active
