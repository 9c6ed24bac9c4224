"""lookm_vllm.core against the slow loop-by-loop reference in tests/core_reference.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from lookm_vllm.core import MERGES as REGISTERED_MERGES
from lookm_vllm.core import SELECTORS, CompressionConfig, accumulated_attention, compress

from .core_reference import (
    reference_kept_engine,
    reference_kept_paper,
    reference_merge,
    reference_scores,
)

NUM_KV_HEADS = 2
GROUPS = [1, 2, 4, 8]  # query heads per KV head (GQA ratio)
HEAD_DIMS = [64, 80, 128]
LAYOUTS = ["none", "start", "middle", "end", "many", "in_recent", "all"]
BUDGETS = [(0.2, 0.1), (0.5, 0.1), (0.05, 0.02), (0.3, 0.0), (0.6, 0.3)]
# Every registered method and merge, each of which needs its own independent reference in
# core_reference.py: lookm, h2o, snapkv, streaming, random; none, average, pivotal, weighted.
METHODS = list(SELECTORS)
MERGES = ["none", *sorted(REGISTERED_MERGES)]
SCOPES = ["all", "same_modality"]


def image_mask(layout: str, length: int) -> torch.Tensor:
    """Image-token positions for a named layout of a prompt of ``length`` tokens."""
    mask = torch.zeros(length, dtype=torch.bool)
    spans = {
        "none": [],
        "start": [(0, length // 3)],
        "middle": [(length // 4, 3 * length // 4)],
        "end": [(length // 2, length)],  # runs through the recent window
        "many": [(s, s + length // 10) for s in range(3, length - length // 10, length // 5)],
        "in_recent": [(length // 5, length // 3), (length - length // 8, length - 2)],
        "all": [(0, length)],
    }[layout]
    for start, end in spans:
        mask[start:end] = True
    return mask


def random_layer(seed: int, length: int, head_dim: int, group: int = 1):
    generator = torch.Generator().manual_seed(seed)
    shape = (NUM_KV_HEADS, length, head_dim)
    keys = torch.randn(shape, generator=generator, dtype=torch.float64)
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    # Scaled up so attention is far from uniform and rankings are decided by clear margins.
    queries = 3 * torch.randn(NUM_KV_HEADS * group, length, head_dim, generator=generator,
                              dtype=torch.float64)
    return queries, keys, values


def assert_matches_reference(out, keys, values, kept, is_image, config):
    assert out.kept.tolist() == kept
    ref_keys, ref_values = reference_merge(keys, values, kept, is_image, config.merge,
                                           config.merge_scope)
    torch.testing.assert_close(out.keys, ref_keys, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.values, ref_values, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("observed", ["all", "window"])
def test_accumulated_attention_matches_reference(group, head_dim, observed):
    queries, keys, _ = random_layer(group * 10 + head_dim, 48, head_dim, group)
    if observed == "window":
        queries = queries[:, -7:]
    scores = accumulated_attention(queries, keys)
    assert scores.dtype == torch.float32 and scores.shape == (NUM_KV_HEADS, 48)
    torch.testing.assert_close(scores.double(), reference_scores(queries, keys),
                               rtol=1e-5, atol=1e-6)


MATRIX = list(itertools.product(METHODS, MERGES, SCOPES))


@pytest.mark.parametrize("case", range(len(MATRIX)),
                         ids=["-".join(MATRIX[i]) for i in range(len(MATRIX))])
def test_every_method_and_merge_matches_reference(case):
    method, merge, scope = MATRIX[case]
    length = 60 + 7 * (case % 9)
    head_dim = HEAD_DIMS[case % 3]
    layout = LAYOUTS[case % len(LAYOUTS)]
    budget, recent_ratio = BUDGETS[case % len(BUDGETS)]
    config = CompressionConfig(method=method, merge=merge, merge_scope=scope, budget=budget,
                               recent_ratio=recent_ratio, seed=case, sink_tokens=case % 6)
    _, keys, values = random_layer(case, length, head_dim)
    scores = torch.rand(NUM_KV_HEADS, length, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1000 + case))
    is_image = image_mask(layout, length)

    out = compress(keys, values, scores, is_image, config)

    kept = reference_kept_paper(method, scores, is_image, budget, recent_ratio,
                                seed=case, sink_tokens=case % 6)
    assert_matches_reference(out, keys, values, kept, is_image, config)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("group,head_dim", [(1, 64), (2, 80), (4, 128), (8, 64)])
def test_lookm_end_to_end_matches_reference(layout, group, head_dim):
    """Scores from real queries, every image layout, every GQA ratio, LOOK-M defaults."""
    seed = LAYOUTS.index(layout) * 100 + group * 10 + head_dim
    length = 40 + seed % 50
    queries, keys, values = random_layer(seed, length, head_dim, group)
    is_image = image_mask(layout, length)
    scope = SCOPES[seed % 2]
    # A budget above the text share makes the text prior rank image tokens too.
    budget = 0.3 if group in (1, 4) else 0.6
    config = CompressionConfig(budget=budget, recent_ratio=0.1, merge_scope=scope)

    out = compress(keys, values, accumulated_attention(queries, keys), is_image, config)

    kept = reference_kept_paper("lookm", reference_scores(queries, keys), is_image, budget, 0.1)
    assert_matches_reference(out, keys, values, kept, is_image, config)
    assert out.compressed == (layout != "none")


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_window_scoring_end_to_end_matches_reference(method):
    queries, keys, values = random_layer(7, 90, 64, group=4)
    config = CompressionConfig(method=method, scoring="window", window=9, merge="pivotal")
    window_queries = queries[:, -config.window:]
    is_image = image_mask("many", 90)

    out = compress(keys, values, accumulated_attention(window_queries, keys), is_image, config)

    kept = reference_kept_paper(method, reference_scores(window_queries, keys), is_image,
                                config.budget, config.recent_ratio)
    assert_matches_reference(out, keys, values, kept, is_image, config)


ENGINE_CASES = list(itertools.product(METHODS, [1, 4, 16]))


@pytest.mark.parametrize("method,keep_multiple", ENGINE_CASES)
def test_evictable_and_keep_multiple_match_reference(method, keep_multiple):
    case = ENGINE_CASES.index((method, keep_multiple))
    length = 96 + 5 * case
    _, keys, values = random_layer(case, length, 64)
    scores = torch.rand(NUM_KV_HEADS, length, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(case))
    is_image = image_mask("many", length) | image_mask("middle", length)
    # As an engine with 16-token blocks: only whole blocks inside image spans are evictable.
    blocks = is_image[: length // 16 * 16].view(-1, 16).all(dim=1)
    evictable = torch.zeros(length, dtype=torch.bool)
    evictable[: length // 16 * 16] = blocks.repeat_interleave(16)
    evictable[length // 2: length // 2 + 3] = False  # and a few scattered pinned positions
    evictable[-6:] = True  # and evictable positions in the (protected) recent window
    # LOOK-M keeps all text (about 40 % here): only a larger budget makes it rank image tokens.
    budget = 0.6 if method == "lookm" else 0.25
    config = CompressionConfig(method=method, merge="pivotal", budget=budget, recent_ratio=0.1)

    out = compress(keys, values, scores, is_image, config, evictable=evictable,
                   keep_multiple=keep_multiple)

    kept = reference_kept_engine(method, scores, is_image, budget, 0.1, evictable.tolist(),
                                 keep_multiple)
    assert_matches_reference(out, keys, values, kept, is_image, config)
    assert out.compressed


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_engine_rule_without_constraints_is_the_paper(method, layout):
    """The two references agree when everything is evictable and nothing is rounded."""
    seed = METHODS.index(method) * 10 + LAYOUTS.index(layout)
    length = 50 + 3 * seed % 40
    scores = torch.rand(NUM_KV_HEADS, length, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))
    is_image = image_mask(layout, length)
    for budget, recent_ratio in BUDGETS:
        paper = reference_kept_paper(method, scores, is_image, budget, recent_ratio, seed=seed)
        engine = reference_kept_engine(method, scores, is_image, budget, recent_ratio,
                                       [True] * length, 1, seed=seed)
        assert engine == paper, (budget, recent_ratio)
