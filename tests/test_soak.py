"""A small soak (``benchmarks.soak``) in the suite: concurrent multimodal chat requests against a
real ``lookm-serve`` with a KV pool that forces preemption, mixed compression configs, streamed
and not, some hung up early. Nothing may fail, the KV pool must come back empty and the server
log must hold no error line."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.engine
pytest.importorskip("vllm")


def test_small_soak_has_no_failure_no_leak_no_error_line(tmp_path, tiny_llava_path):
    from benchmarks import soak

    out = tmp_path / "soak.json"
    code = soak.main(["--requests", "64", "--clients", "16", "--seed", "7", "--settle", "20",
                      "--out", str(out)])
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["failed"] == 0, [r for r in report["requests"] if r["outcome"] == "failed"]
    assert report["after_settle"] == {"vllm:kv_cache_usage_perc": 0.0,
                                      "vllm:num_requests_running": 0.0,
                                      "vllm:num_requests_waiting": 0.0}
    assert report["log"]["error_lines"] == []
    assert code == 0 and report["passed"] and report["problems"] == []
    # the load was what the soak claims it is
    assert summary["ok"] + summary["aborted"] == summary["requests"] == 64
    assert summary["aborted"] > 0 and 0 < summary["streamed"] < 64
    assert summary["compressed_ok"] > 0 and report["counters"]["lookm_kv_blocks_freed"] > 0
    assert report["counters"]["vllm:num_preemptions"] > 0
    assert {r["config"] for r in report["requests"]} == {name for name, _ in soak.CONFIGS}
    # a cache miss vLLM reports is retried (or its client had hung up), none ran out of retries
    assert report["counters"]["lookm_mm_cache_retries"] <= report["log"]["cache_miss_events"]
    assert report["counters"]["lookm_mm_cache_retries_exhausted"] == 0
    assert report["log"]["p0_cache_assertions"] == 0
