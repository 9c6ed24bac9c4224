"""A slow, independent reference of LOOK-M and its baselines, written straight from the paper.

Plain Python loops over heads, queries and tokens (vector ops only for single dot products), in
float64, sharing no code with ``lookm_vllm.core``. Only for the small inputs of the tests.
"""

from __future__ import annotations

import math

import torch


def reference_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Eq. 4: per KV head, sum over the group's query heads and the queries of softmax rows."""
    num_q_heads, num_queries, head_dim = queries.shape
    num_kv_heads, length, _ = keys.shape
    group = num_q_heads // num_kv_heads
    queries, keys = queries.double(), keys.double()
    scores = [[0.0] * length for _ in range(num_kv_heads)]
    for head in range(num_q_heads):
        kv_head = head // group
        for i in range(num_queries):
            position = length - num_queries + i
            logits = (keys[kv_head, : position + 1] @ queries[head, i]).tolist()
            logits = [x / math.sqrt(head_dim) for x in logits]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            total = sum(exps)
            for j, e in enumerate(exps):
                scores[kv_head][j] += e / total
    return torch.tensor(scores, dtype=torch.float64)


def _pooled(row: list[float], kernel: int = 5) -> list[float]:
    half = kernel // 2
    return [
        sum(row[i] for i in range(j - half, j + half + 1) if 0 <= i < len(row)) / kernel
        for j in range(len(row))
    ]


def _top(candidates: list[int], rank: list[float], count: int) -> list[int]:
    return sorted(candidates, key=lambda j: -rank[j])[: max(0, count)]


def _method_rank(method, scores, head, length, seed, sink_tokens):
    if method in ("lookm", "h2o"):
        return scores[head].tolist()
    if method == "snapkv":
        return _pooled(scores[head].tolist())
    if method == "streaming":
        return [float(2 * length - j if j < sink_tokens else j) for j in range(length)]
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(scores.shape[0], length, generator=generator)[head].tolist()
    raise AssertionError(f"no reference for method {method!r}: write one here")


def reference_kept_paper(method, scores, is_image, budget, recent_ratio, seed=0, sink_tokens=4):
    """Kept positions per head, following the paper's wording literally (no engine options)."""
    num_heads, length = scores.shape
    m = int(recent_ratio * length)
    n = int(budget * length) - m
    recent = list(range(length - m, length))
    older = list(range(length - m))
    kept = []
    for head in range(num_heads):
        if method == "lookm":
            row = scores[head].tolist()
            text_prior = max(row)
            adjusted = [row[j] + (0.0 if is_image[j] else text_prior) for j in range(length)]
            text = [j for j in older if not is_image[j]]
            chosen = set(text) | set(_top(older, adjusted, n)) | set(recent)
        elif method == "streaming":
            sinks = older[: min(sink_tokens, n)]
            rest = n - len(sinks)
            chosen = set(sinks) | set(older[len(older) - rest:] if rest else []) | set(recent)
        else:
            rank = _method_rank(method, scores, head, length, seed, sink_tokens)
            chosen = set(_top(older, rank, n)) | set(recent)
        kept.append(sorted(chosen))
    return kept


def reference_kept_engine(method, scores, is_image, budget, recent_ratio, evictable,
                          keep_multiple, seed=0, sink_tokens=4):
    """Kept positions per head under the documented evictable / keep_multiple rule.

    Protected: the last m positions and, for LOOK-M, every text token; candidates: the rest. The
    paper keeps s = max(0, n - protected older) candidates per head. Here every non-evictable
    position is kept, and every head keeps the same number k of evictable positions: its
    protected evictable ones plus its best-ranked evictable candidates, with
    k = min(round_up(protected evictable + ceil(s * evictable candidates / candidates),
    keep_multiple), evictable). k is computed from the layout alone.
    """
    num_heads, length = scores.shape
    m = int(recent_ratio * length)
    n = int(budget * length) - m
    protected = []
    for j in range(length):
        protected.append(j >= length - m or (method == "lookm" and not is_image[j]))
    protected_older = 0
    for j in range(length - m):
        if protected[j]:
            protected_older += 1
    s = max(0, n - protected_older)
    candidates = [j for j in range(length) if not protected[j]]
    evictable_candidates = [j for j in candidates if evictable[j]]
    share = 0
    if candidates:
        # ceil(s * evictable candidates / candidates), in integers.
        share = (s * len(evictable_candidates) + len(candidates) - 1) // len(candidates)
    protected_evictable = 0
    num_evictable = 0
    for j in range(length):
        if evictable[j]:
            num_evictable += 1
            if protected[j]:
                protected_evictable += 1
    k = protected_evictable + share
    while k % keep_multiple:
        k += 1
    k = min(k, num_evictable)
    kept = []
    for head in range(num_heads):
        chosen = set()
        for j in range(length):
            if protected[j] or not evictable[j]:
                chosen.add(j)
        rank = _method_rank(method, scores, head, length, seed, sink_tokens)
        chosen |= set(_top(evictable_candidates, rank, k - protected_evictable))
        kept.append(sorted(chosen))
    return kept


def reference_merge(keys, values, kept, is_image, merge, merge_scope="all"):
    """Eq. 9-12 token by token: each evicted pair joins its most key-cosine-similar kept pair.

    Returns keys and values ``[H, K, d]`` for the kept positions, in float64.
    """
    num_heads, length, _ = keys.shape
    keys, values = keys.double(), values.double()
    out_keys, out_values = [], []
    for head in range(num_heads):
        kept_h = kept[head]
        evicted_h = [j for j in range(length) if j not in set(kept_h)]
        received = {c: [] for c in kept_h}  # c -> [(j, similarity)]
        unit = keys[head] / keys[head].norm(dim=-1, keepdim=True)
        for j in evicted_h if merge != "none" else []:
            similarities = (unit[kept_h] @ unit[j]).tolist()
            best, best_sim = None, -math.inf
            for c, sim in zip(kept_h, similarities, strict=True):
                if merge_scope == "same_modality" and bool(is_image[c]) != bool(is_image[j]):
                    continue
                if sim > best_sim:
                    best, best_sim = c, sim
            if best is not None:
                received[best].append((j, best_sim))
        head_keys, head_values = [], []
        for c in kept_h:
            rows = []
            for tensor in (keys, values):
                own = tensor[head, c]
                if not received[c]:
                    rows.append(own.clone())
                    continue
                total = own.clone()
                for j, sim in received[c]:
                    if merge == "average":
                        total = total + tensor[head, j]
                    elif merge == "pivotal":
                        total = total + (tensor[head, j] + own) / 2
                    elif merge == "weighted":
                        total = total + sim * tensor[head, j]
                    else:
                        raise AssertionError(f"no reference for merge {merge!r}: write one here")
                rows.append(total / (1 + len(received[c])))
            head_keys.append(rows[0])
            head_values.append(rows[1])
        out_keys.append(torch.stack(head_keys))
        out_values.append(torch.stack(head_values))
    return torch.stack(out_keys), torch.stack(out_values)
