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
    # the opening burst (one long request per client at once) needs twice the pool: vLLM
    # preempted, and every burst request still completed
    assert report["burst"]["ok"] == report["burst"]["requests"] > 0
    assert report["burst"]["preemptions"] > 0
    assert report["counters"]["vllm:num_preemptions"] >= report["burst"]["preemptions"]
    assert {r["config"] for r in report["requests"]} == {name for name, _ in soak.CONFIGS}
    # a cache miss vLLM reports is retried (or its client had hung up), none ran out of retries
    assert report["counters"]["lookm_mm_cache_retries"] <= report["log"]["cache_miss_events"]
    assert report["counters"]["lookm_mm_cache_retries_exhausted"] == 0
    assert report["log"]["p0_cache_assertions"] == 0


def test_multi_turn_soak_with_prefix_caching(tmp_path, tiny_llava_path):
    """Conversations of up to 3 turns (each re-sends the images and the answers) with vLLM's
    prefix caching on, compressed and not, under preemption and hang-ups: later turns read the
    cache, nothing fails or leaks, and canary chats answer the same before and after the load,
    each right after a compressed request over its images whose cached blocks it reads."""
    from benchmarks import soak

    out = tmp_path / "soak-turns.json"
    # a pool of 4 largest requests: on 1.25 the concurrent load evicted every later turn's
    # cached prefix before it came (the opening burst still forces preemption)
    code = soak.main(["--requests", "40", "--clients", "8", "--seed", "11", "--settle", "20",
                      "--turns", "3", "--prefix-caching", "--pool-requests", "4",
                      "--out", str(out)])
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["failed"] == 0 and summary["skipped"] == 0, [
        r for r in report["requests"] if r["outcome"] in ("failed", "skipped")]
    assert report["after_settle"] == {"vllm:kv_cache_usage_perc": 0.0,
                                      "vllm:num_requests_running": 0.0,
                                      "vllm:num_requests_waiting": 0.0}
    assert report["log"]["error_lines"] == []
    assert code == 0 and report["passed"]
    assert summary["ok"] + summary["aborted"] == summary["requests"] == 40
    assert summary["conversations"] < 40 and summary["later_turns"] > 0
    # the opening burst (one long request per client at once) needs twice the pool: vLLM
    # preempted, and every burst request still completed
    assert report["burst"]["ok"] == report["burst"]["requests"] > 0
    assert report["burst"]["preemptions"] > 0
    assert report["counters"]["vllm:num_preemptions"] >= report["burst"]["preemptions"]
    assert report["counters"]["lookm_kv_blocks_freed"] > 0
    # later turns were served from the cache, compressed ones included
    assert summary["later_turns_cached_tokens"] > 0 and summary["prefix_reused_tokens"] > 0
    canaries = report["canaries"]
    assert len(canaries) == 3 and all(c["unchanged"] for c in canaries)
    assert all(c["primer_kv_compression"]["kv_blocks_freed"] > 0 for c in canaries)
    assert all(c["after_cached_tokens"] > 0 for c in canaries)
