"""Prefix caching with compressed requests, without an engine: compaction into private blocks
leaves the original (possibly shared, hashed) blocks untouched, the read view substitutes the
private blocks, the scheduler's hole count equals the compaction's, and the re-chained block
hashes keep the ordinary chain below the cap and a private one from it on."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lookm_vllm.core import CompressionConfig
from lookm_vllm.vllm_adapter.compaction import (
    HoleMap,
    compact_prompt,
    compacted_view,
    gather_prompt,
    read_slots,
)
from lookm_vllm.vllm_adapter.kv_layout import CpuAttnLayout
from lookm_vllm.vllm_adapter.plan import RequestPlan
from lookm_vllm.vllm_adapter.prefix_cache import hit_cap, num_holes, rechain_hashes

BS = 8


def make_plan(config, prompt_len=100, spans=((5, 45), (50, 90))):
    return RequestPlan(CompressionConfig.parse(config), prompt_len, spans)


@pytest.mark.parametrize("merge", ["pivotal", "average", "none"])
def test_compaction_into_private_blocks_equals_in_place_and_leaves_originals_alone(merge):
    g = torch.Generator().manual_seed(7)
    heads, dim, prompt_len = 2, 16, 100
    plan = make_plan({"method": "lookm", "budget": 0.3, "merge": merge})
    cache = torch.randn(40, heads, BS, 2 * dim, generator=g)
    layout = CpuAttnLayout()
    row = torch.randperm(20, generator=g)[:13]              # blocks 0..19: the request's
    scores = torch.rand(heads, prompt_len, generator=g)

    in_place = cache.clone()
    k_ip, v_ip = layout.split(in_place)
    expected = compact_prompt(k_ip, v_ip, row, plan, scores)

    holes = num_holes(plan, BS)
    assert holes == len(expected.holes) > 0          # the scheduler's count, without scores
    num_full = prompt_len // BS
    targets = list(range(20, 20 + num_full - holes))     # private blocks from the free part
    before = cache.clone()
    key_cache, value_cache = layout.split(cache)
    result = compact_prompt(key_cache, value_cache, row, plan, scores, targets=targets)

    assert result.holes == expected.holes and torch.equal(result.kept, expected.kept)
    # the full prompt blocks (shared or hashed) are untouched; the partial last one is the
    # request's own block and may take merged entries
    assert torch.equal(cache[row[:num_full]], before[row[:num_full]])
    # the compacted prompt reads the same through the private row as in place
    got = read_slots(key_cache, value_cache, result.row, result.slots)
    want = read_slots(k_ip, v_ip, row, expected.slots)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # the read view substitutes the private blocks, in column order, and holds every kept entry
    lens = torch.tensor([prompt_len + 3])
    table, seq_lens, _ = compacted_view(row[None], lens, lens,
                                        [(0, HoleMap.from_holes(result.holes, targets))], BS)
    assert table[0, :len(targets)].tolist() == targets
    assert table[0, len(targets)].item() == row[num_full].item()       # then the tail
    view = gather_prompt(key_cache, value_cache, table[0], result.num_kept)
    view_ip = gather_prompt(k_ip, v_ip, compacted_view(
        row[None], lens, lens, [(0, HoleMap.from_holes(expected.holes))], BS)[0][0],
        expected.num_kept)
    for a, b in zip(view, view_ip, strict=True):
        assert torch.equal(a, b)
    assert seq_lens.item() == prompt_len + 3 - holes * BS


def test_compaction_refuses_a_wrong_number_of_private_blocks():
    g = torch.Generator().manual_seed(8)
    plan = make_plan({"method": "lookm", "budget": 0.2})
    cache = torch.randn(40, 2, BS, 32, generator=g)
    key_cache, value_cache = CpuAttnLayout().split(cache)
    with pytest.raises(RuntimeError, match="private blocks"):
        compact_prompt(key_cache, value_cache, torch.arange(13), plan,
                       torch.rand(2, 100, generator=g), targets=[30])


@pytest.mark.parametrize("config,prompt_len,spans", [
    ({"method": "lookm", "budget": 0.2}, 100, ((5, 45), (50, 90))),
    ({"method": "lookm", "budget": 0.1, "merge": "average"}, 300, ((10, 150), (151, 280))),
    ({"method": "h2o", "budget": 0.3}, 200, ()),
    ({"method": "snapkv", "budget": 0.25}, 200, ((0, 190),)),
    ({"method": "lookm", "max_kv_tokens": 60}, 300, ((10, 280),)),
    ({"method": "lookm", "budget": 1.0}, 100, ((5, 90),)),
])
def test_scheduler_hole_count_equals_the_compaction(config, prompt_len, spans):
    g = torch.Generator().manual_seed(9)
    plan = make_plan(config, prompt_len, spans)
    cache = torch.randn(64, 2, BS, 32, generator=g)
    key_cache, value_cache = CpuAttnLayout().split(cache)
    result = compact_prompt(key_cache, value_cache, torch.arange(64), plan,
                            torch.rand(2, prompt_len, generator=g))
    assert num_holes(plan, BS) == len(result.holes)


def test_hit_cap_leaves_the_scoring_queries_and_the_last_token_to_compute():
    window = make_plan({"method": "lookm", "budget": 0.2, "scoring": "window", "window": 20},
                       prompt_len=100)
    assert hit_cap(window, BS) == (100 - 20) // BS
    full = make_plan({"method": "lookm", "budget": 0.2, "scoring": "full"}, prompt_len=100)
    assert hit_cap(full, BS) == 0                            # private re-prefill
    exact_blocks = make_plan({"method": "streaming", "budget": 0.2}, prompt_len=96)
    assert exact_blocks.num_scoring_queries == 0
    assert hit_cap(exact_blocks, BS) == 95 // BS             # the last token is recomputed


class FakeRequest:
    """What ``rechain_hashes`` reads of vLLM's Request: a chained hasher over full blocks."""

    def __init__(self, tokens, salt=b""):
        self.tokens = list(tokens)
        self.block_hashes = []
        self._block_hasher = self._hasher
        self.update_block_hashes()

    @staticmethod
    def _hasher(req):   # vLLM's shape: hashes the full blocks after req.block_hashes, chained
        out, parent = [], req.block_hashes[-1] if req.block_hashes else b"root"
        start = len(req.block_hashes) * BS
        while start + BS <= len(req.tokens):
            parent = hashlib.sha256(parent + bytes(req.tokens[start:start + BS])).digest()
            out.append(parent)
            start += BS
        return out

    def update_block_hashes(self):
        if self._block_hasher is not None:
            self.block_hashes.extend(self._block_hasher(self))

    def append(self, tokens):
        self.tokens += tokens
        self.update_block_hashes()


def test_rechained_hashes_are_ordinary_below_the_cap_and_private_from_it():
    tokens = list(range(60))
    plain, a, b = FakeRequest(tokens), FakeRequest(tokens), FakeRequest(tokens)
    rechain_hashes(a, 3, "salt-a")
    rechain_hashes(b, 3, "salt-b")
    assert len(a.block_hashes) == len(plain.block_hashes) == 60 // BS
    assert a.block_hashes[:3] == plain.block_hashes[:3] == b.block_hashes[:3]
    for i in range(3, 60 // BS):      # every block from the cap on: private, and per salt
        assert a.block_hashes[i] != plain.block_hashes[i] != b.block_hashes[i]
        assert a.block_hashes[i] != b.block_hashes[i]
    # blocks filled later (decoded tokens) chain from the private hash
    for req in (plain, a):
        req.append(list(range(100, 120)))
    assert len(a.block_hashes) == len(plain.block_hashes) == 80 // BS
    assert not set(a.block_hashes[3:]) & set(plain.block_hashes)
    # re-salting (a preemption) keeps the ordinary prefix and changes everything after
    old = list(a.block_hashes)
    rechain_hashes(a, 3, "salt-a2")
    assert a.block_hashes[:3] == old[:3] and len(a.block_hashes) == len(old)
    assert not set(a.block_hashes[3:]) & set(old[3:])
    # a cap past the hashed blocks: nothing is salted until that block fills
    late = FakeRequest(tokens)
    rechain_hashes(late, 20, "x")
    assert late.block_hashes == plain.block_hashes[:60 // BS]


def test_after_the_lookup_the_full_prompt_blocks_publish_ordinary_hashes():
    """Capped for the lookup, then (``salt_at`` = the prompt's full blocks) ordinary up to the
    prompt's last full block, so the next turn hits the whole earlier prompt; blocks holding
    output tokens stay private; capping again (no room, or a preemption) restores the lookup
    state."""
    prompt, pf = list(range(60)), 60 // BS               # 7 full prompt blocks
    plain, req = FakeRequest(prompt), FakeRequest(prompt)
    rechain_hashes(req, 3, "s")                          # the lookup state
    assert req.block_hashes[:3] == plain.block_hashes[:3]
    assert not set(req.block_hashes[3:]) & set(plain.block_hashes)
    rechain_hashes(req, 3, "s", salt_at=pf)              # published state
    assert req.block_hashes == plain.block_hashes[:pf]
    for r in (plain, req):                               # outputs fill blocks 7.. (block 7 has
        r.append(list(range(100, 130)))                  # prompt tail and outputs)
    assert req.block_hashes[:pf] == plain.block_hashes[:pf]
    assert not set(req.block_hashes[pf:]) & set(plain.block_hashes)
    rechain_hashes(req, 3, "t")                          # capped again
    assert req.block_hashes[:3] == plain.block_hashes[:3]
    assert not set(req.block_hashes[3:]) & set(plain.block_hashes)
    with pytest.raises(ValueError):
        rechain_hashes(req, 3, "s", salt_at=2)
