"""The benchmarks run end to end in --quick mode and write every field (not their speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.engine


def run(module: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_capacity_quick(tmp_path):
    report = run("benchmarks.capacity", tmp_path / "capacity.json")
    assert (tmp_path / "capacity.png").stat().st_size > 0
    assert {"machine", "workload", "prompt_tokens", "pool_blocks", "pool_bytes",
            "blocks_per_stock_request", "arms", "ratios_to_stock", "gpu_projection"} <= set(report)
    names = [arm["name"] for arm in report["arms"]]
    assert names[:3] == ["stock", "lookm-0.2", "lookm-0.1"]
    for arm in report["arms"]:
        assert arm["requests"] == report["workload"]["num_requests"]
        assert arm["output_tokens"] == arm["requests"] * report["workload"]["max_tokens"]
        for key in ("output_tokens_per_s", "requests_per_s", "peak_running", "mean_running",
                    "preemptions", "peak_kv_blocks_in_use", "mean_kv_blocks_in_use"):
            assert arm[key] >= 0, key
        assert 1 <= arm["peak_decoding"] <= arm["requests"] and arm["mean_decoding"] > 0
        assert {"p50", "p90", "p99"} <= set(arm["ttft_s"]) and {"p50", "p90"} <= set(arm["tpot_s"])
        assert arm["prefill_s_uncompressed"] > 0 and arm["prefill_s"] > 0
        assert arm["mean_prefill_s_under_load"] > 0
        assert arm["preemption_recompute_s"] == pytest.approx(arm["preemptions"] * (
            arm["prefill_s_uncompressed"]
            + ((arm["scoring_ms"] or 0) + (arm["compression_ms"] or 0)) / 1e3))
    for arm in report["arms"]:
        if arm["config"] is None:
            assert arm["kv_tokens_kept_fraction"] is None and arm["scoring_ms"] is None
            assert arm["prefill_s"] == arm["prefill_s_uncompressed"]
        else:
            assert 0 < arm["kv_tokens_kept_fraction"] < 1
            assert arm["kv_blocks_freed_per_request"] > 0
            assert arm["scoring_ms"] > 0 and arm["compression_ms"] > 0
            assert arm["overhead_pct_of_prefill"] == pytest.approx(100 * (
                arm["scoring_ms"] + arm["compression_ms"]) / 1e3 / arm["prefill_s_uncompressed"])
    assert set(report["ratios_to_stock"]) == set(names)
    assert report["thread_binding"]["every_server_env"]["VLLM_CPU_NUM_OF_RESERVED_CPU"]
    if "stock-fp8" in names:  # same pool bytes: an fp8 cache holds 4x the float32 blocks
        arms = {arm["name"]: arm for arm in report["arms"]}
        assert arms["stock-fp8"]["pool_blocks"] == 4 * arms["stock"]["pool_blocks"]
        assert set(report["ratios_to_stock_fp8"]) == {"lookm-0.2-fp8"}
    rows = report["gpu_projection"]
    assert {row["arm"] for row in rows} == {"stock", *(n for n in names[1:]
                                                        if not n.endswith("fp8"))}
    assert all(row["max_batch"] >= 1 and row["decode_step_ms"] > 0 for row in rows)


def test_client_side_concurrency_is_the_overlap_of_decoding_intervals():
    from benchmarks.capacity import overlap

    assert overlap([(0, 2), (1, 3), (4, 5)], 5.0) == (2.0, 1.0)
    assert overlap([(0, 1), (1, 2)], 2.0) == (1.0, 1.0)   # one ends as the next starts
    assert overlap([], 1.0) == (0.0, 0.0)


def test_decode_quick(tmp_path):
    report = run("benchmarks.decode", tmp_path / "decode.json")
    (run_,) = report["runs"]
    assert set(run_["arms"]) == {"none", "lookm-0.2", "lookm-0.1"}
    assert run_["arms"]["none"]["ratio_to_none"] == 1.0
    for name in ("lookm-0.2", "lookm-0.1"):
        arm = run_["arms"][name]
        assert arm["decode_step_ms"] > 0 and arm["stats"]["kv_blocks_freed"] > 0
        assert arm["prefill_ms"] > 0 and arm["second_step_ms"] > 0 and arm["overhead_ms"] > 0
        assert arm["overhead_of_prefill"] == arm["overhead_ms"] / run_["prefill_ms_none"]
    assert run_["arms"]["none"]["overhead_ms"] == 0
    for arm in run_["arms"].values():  # preempted once (checked by the benchmark), replayed
        assert arm["preemption_replay_ms"] > 0 and arm["replay_tokens_match"] is True


def test_proxy_7b_quick(tmp_path):
    report = run("benchmarks.proxy_7b", tmp_path / "proxy.json")
    (row,) = report["rows"]
    assert row["prefill_ms_none"] > 0 and set(row["arms"]) == {
        "none", "full+pivotal", "window+pivotal", "full+none"}
    for name in ("full+pivotal", "window+pivotal", "full+none"):
        arm = row["arms"][name]
        assert arm["scoring_ms"] > 0 and arm["compression_ms"] > 0
        assert arm["kv_tokens_kept"] < row["prompt_tokens"]
        assert arm["overhead_of_prefill"] == pytest.approx(
            (arm["scoring_ms"] + arm["compression_ms"]) / row["prefill_ms_none"], rel=0.01)
