"""Scheduler side of prefix caching for compressed requests (docs/engine.md, "Prefix caching
with compressed requests").

A compressed request may READ the prefix cache for the prompt blocks its scoring does not need
to recompute, and never modifies a block that is shared or hashed:

* :func:`hit_cap` - the full blocks it may hit: those wholly before its scoring queries;
* :func:`rechain_hashes` - for the lookup, its block hashes keep vLLM's ordinary chain below that
  cap and are salted (per request and epoch) from it on, so it hits nothing past the cap; once
  the lookup is done (``get_num_new_matched_tokens``), its full prompt blocks get their ordinary
  hashes back (never written: compaction writes private blocks) and only the blocks holding
  output tokens stay salted, so the next turn hits the whole earlier prompt, as in stock vLLM;
* :func:`num_holes` - how many prompt blocks compression frees (a function of the plan only),
  so the scheduler can allocate the private blocks the compacted prompt is written to.

vLLM names used here (contract tests in tests/test_vllm_contract.py::test_prefix_cache_names):
``Request._block_hasher`` / ``block_hashes`` / ``update_block_hashes``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .plan import RequestPlan

SALTED_ATTR = "lookm_unsalted"


def hit_cap(plan: RequestPlan, block_size: int) -> int:
    """Full blocks a compressed request may read from the prefix cache: those ending at or
    before its first scoring query (and before its last prompt token, so the prompt's end is
    always computed and compressed in this run)."""
    return max(0, plan.prompt_len - max(plan.num_scoring_queries, 1)) // block_size


def num_holes(plan: RequestPlan, block_size: int) -> int:
    """Prompt blocks compression will free (``RequestPlan.holes``: known without scores)."""
    return len(plan.holes(block_size))


def _salted(block_hash: Any, salt: bytes) -> Any:
    raw = bytes(block_hash)
    return type(block_hash)(hashlib.blake2b(salt + raw, digest_size=min(len(raw), 64))
                            .digest())


def rechain_hashes(request: Any, cap: int, salt: str, salt_at: int | None = None) -> None:
    """Give ``request`` its ordinary block hashes below block ``salt_at`` (default ``cap``) and
    salt the hash of block ``salt_at`` (every later one chains from it). Recomputes the hashes
    from ``cap`` on now (those below ``cap`` are ordinary in every state) and wraps the
    request's hasher, which vLLM calls whenever more blocks fill up. Calling it again switches
    states: ``salt_at = cap`` for the prefix-cache lookup (no hit past ``cap``), ``salt_at =
    P // block_size`` once the lookup is done (its full prompt blocks publish ordinary hashes)."""
    hasher = request._block_hasher
    if hasher is None:   # prefix caching off: no hashes at all
        return
    base = getattr(hasher, SALTED_ATTR, hasher)
    salt_bytes = salt.encode()
    salt_at = cap if salt_at is None else salt_at
    if salt_at < cap:
        raise ValueError(f"salt_at {salt_at} < cap {cap}")

    def chained(req: Any) -> list:
        start = len(req.block_hashes)
        new_hashes: list = []
        try:   # base hashes the blocks after req.block_hashes: extend it while looping
            while True:
                batch = base(req)
                if not batch:
                    break
                first = len(req.block_hashes)
                if first <= salt_at < first + len(batch):
                    batch = batch[:salt_at - first + 1]
                    batch[-1] = _salted(batch[-1], salt_bytes)
                req.block_hashes.extend(batch)
                new_hashes.extend(batch)
        finally:
            del req.block_hashes[start:]
        return new_hashes

    setattr(chained, SALTED_ATTR, base)
    request._block_hasher = chained
    del request.block_hashes[cap:]
    request.update_block_hashes()
