"""Properties of lookm_vllm.core that hold for any input: counts, identities, chunking, dtypes."""

from __future__ import annotations

import itertools

import pytest
import torch

import lookm_vllm.core.merge as merge_module
import lookm_vllm.core.scoring as scoring_module
from lookm_vllm.core import (
    SELECTORS,
    AttentionAccumulator,
    CompressionConfig,
    accumulated_attention,
    compress,
    selector_for,
)

from .core_reference import reference_scores
from .test_core_reference import LAYOUTS, image_mask

METHODS = list(SELECTORS)  # every registered method (lookm, h2o, snapkv, streaming, random)


def always_kept(config, is_image):
    """The method's protected positions besides the recent window (all False if it has none)."""
    kept = selector_for(config).always_kept(is_image)
    return torch.zeros_like(is_image) if kept is None else kept


def layer(seed: int, length: int = 120, heads: int = 4, head_dim: int = 32,
          dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(heads, length, head_dim, generator=generator).to(dtype)
    values = torch.randn(heads, length, head_dim, generator=generator).to(dtype)
    scores = torch.rand(heads, length, generator=generator)
    return keys, values, scores


def assert_consistent(out, length):
    """The invariants every CompressedKV must satisfy."""
    heads = out.kept.shape[0]
    assert out.kept.dtype == torch.int64 and out.kept.shape == (heads, out.num_kept)
    assert (out.kept_mask.sum(dim=1) == out.num_kept).all()  # same count in every head
    assert (out.kept.diff(dim=1) > 0).all()  # ascending
    assert torch.equal(torch.zeros_like(out.kept_mask).scatter_(1, out.kept, True),
                       out.kept_mask)
    assert out.keys.shape[:2] == out.values.shape[:2] == (heads, out.num_kept)
    assert out.merge_counts.shape == out.kept.shape
    assert out.compressed == (out.num_kept < length)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("merge", ["none", "pivotal"])
@pytest.mark.parametrize("budget", [0.01, 0.2, 0.7])
def test_kept_count_is_the_same_for_every_head(method, merge, budget):
    keys, values, scores = layer(hash((method, merge, budget)) % 1000)
    is_image = image_mask("many", 120)
    config = CompressionConfig(method=method, merge=merge, budget=budget,
                               recent_ratio=min(0.1, budget))
    out = compress(keys, values, scores, is_image, config)
    assert_consistent(out, 120)
    n_recent = int(config.recent_ratio * 120)
    # LOOK-M protects the text: max(n_text_older, N); a method protecting nothing keeps N.
    n_protected_older = int(always_kept(config, is_image)[: 120 - n_recent].sum())
    important = int(budget * 120) - n_recent
    expected = max(n_protected_older, important)
    assert out.num_kept == expected + n_recent


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("budget", [0.01, 0.1, 0.5])
def test_lookm_never_evicts_text(layout, budget):
    keys, values, scores = layer(LAYOUTS.index(layout))
    is_image = image_mask(layout, 120)
    out = compress(keys, values, scores, is_image,
                   CompressionConfig(budget=budget, recent_ratio=budget / 2))
    assert_consistent(out, 120)
    assert out.kept_mask[:, ~is_image].all()


def test_lookm_keeps_the_best_image_tokens_per_head():
    keys, values, scores = layer(3)
    is_image = image_mask("all", 120)
    out = compress(keys, values, scores, is_image, CompressionConfig(budget=0.3))
    for head in range(scores.shape[0]):
        older = scores[head, :108]
        expected = set(older.topk(24).indices.tolist()) | set(range(108, 120))
        assert set(out.kept[head].tolist()) == expected
    assert not all(torch.equal(out.kept[0], row) for row in out.kept)  # heads differ


@pytest.mark.parametrize("method", METHODS + ["none"])
def test_budget_one_and_method_none_are_identities(method):
    keys, values, scores = layer(1)
    is_image = image_mask("middle", 120)
    configs = [CompressionConfig(method=method, budget=1.0, recent_ratio=0.1),
               CompressionConfig(method="none", budget=0.2)]
    for config in configs:
        out = compress(keys, values, scores, is_image, config)
        assert out.keys is keys and out.values is values
        assert torch.equal(out.kept, torch.arange(120).expand(4, 120))
        assert not out.compressed and out.num_kept == out.num_kept_evictable == 120
        assert not out.merge_counts.any()


def test_lookm_leaves_text_only_prompts_alone_and_needs_no_scores():
    keys, values, _ = layer(2)
    for is_image in (None, torch.zeros(120, dtype=torch.bool)):
        out = compress(keys, values, None, is_image, CompressionConfig())
        assert out.keys is keys and not out.compressed


@pytest.mark.parametrize("method", [m for m in METHODS if not SELECTORS[m].needs_scores])
def test_positional_methods_need_no_scores(method):
    keys, values, _ = layer(2)
    out = compress(keys, values, None, image_mask("start", 120),
                   CompressionConfig(method=method, merge="average"))
    assert_consistent(out, 120)
    assert out.num_kept == 24


def test_scores_are_required_where_attention_ranks():
    keys, values, _ = layer(2)
    with pytest.raises(ValueError, match="scores are required"):
        compress(keys, values, None, image_mask("start", 120), CompressionConfig(method="h2o"))


@pytest.mark.parametrize(
    "bad,match",
    [({"scores": torch.rand(4, 119)}, "scores must be"),
     ({"is_image": torch.zeros(120)}, "is_image must be a bool"),
     ({"evictable": torch.ones(7, dtype=torch.bool)}, "evictable must be a bool"),
     ({"keep_multiple": 0}, "keep_multiple must be >= 1")],
)
def test_bad_arguments_are_rejected(bad, match):
    keys, values, scores = layer(2)
    arguments = {"scores": scores, "is_image": image_mask("start", 120)} | bad
    with pytest.raises(ValueError, match=match):
        compress(keys, values, arguments.pop("scores"), arguments.pop("is_image"),
                 CompressionConfig(), **arguments)


def test_same_modality_merges_images_only_into_images():
    keys, values, scores = layer(4)
    is_image = image_mask("many", 120)
    out = compress(keys, values, scores, is_image,
                   CompressionConfig(budget=0.6, merge_scope="same_modality"))
    receiving = out.kept[out.merge_counts > 0]
    assert receiving.numel() and is_image[receiving].all()
    assert out.merge_counts.sum(dim=1).eq(120 - out.num_kept).all()  # no image was dropped
    # With no image kept, evicted images have nowhere to go and are dropped.
    out = compress(keys, values, scores, is_image,
                   CompressionConfig(budget=0.1, recent_ratio=0.0, merge_scope="same_modality"))
    assert not out.kept_mask[:, is_image].any() and not out.merge_counts.any()
    torch.testing.assert_close(out.keys, keys[:, ~is_image])


# Chunked prefill -----------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 4])
def test_chunked_accumulation_equals_one_shot(group):
    generator = torch.Generator().manual_seed(group)
    length, kv_heads = 150, 2
    queries = torch.randn(kv_heads * group, length, 64, generator=generator)
    keys = torch.randn(kv_heads, length, 64, generator=generator)
    accumulator = AttentionAccumulator(kv_heads)
    bounds = [0, 1, 33, 34, 100, 150]
    for start, end in itertools.pairwise(bounds):  # as an engine: each chunk sees keys [0, end)
        accumulator.update(queries[:, start:end], keys[:, :end], query_start=start)
        assert accumulator.scores.shape == (kv_heads, end)
    torch.testing.assert_close(accumulator.scores, accumulated_attention(queries, keys),
                               rtol=1e-5, atol=1e-5)
    # Every query row sums to one: the total is (query heads) x (queries).
    torch.testing.assert_close(accumulator.scores.sum(), torch.tensor(kv_heads * group * 150.0))


def test_window_accumulation_across_a_chunk_boundary():
    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(8, 100, 32, generator=generator)
    keys = torch.randn(2, 100, 32, generator=generator)
    accumulator = AttentionAccumulator(2)
    accumulator.update(queries[:, 90:95], keys[:, :95], query_start=90)  # last W=10 queries,
    accumulator.update(queries[:, 95:], keys, query_start=95)  # split over two chunks
    torch.testing.assert_close(accumulator.scores, accumulated_attention(queries[:, 90:], keys))


def test_query_blocks_do_not_change_scores(monkeypatch):
    generator = torch.Generator().manual_seed(6)
    queries = torch.randn(4, 80, 32, generator=generator)
    keys = torch.randn(2, 80, 32, generator=generator)
    whole = accumulated_attention(queries, keys)
    # 3 queries a block (CPU tensors use the CPU block size), and with a query offset
    monkeypatch.setattr(scoring_module, "_CPU_BLOCK_ELEMENTS", 4 * 80 * 3)
    monkeypatch.setattr(scoring_module, "_CPU_MIN_ROWS", 1)
    torch.testing.assert_close(accumulated_attention(queries, keys), whole)
    torch.testing.assert_close(accumulated_attention(queries[:, 50:], keys),
                               reference_scores(queries[:, 50:], keys).float())


def test_similarity_blocks_do_not_change_merges(monkeypatch):
    keys, values, scores = layer(7)
    is_image = image_mask("middle", 120)
    config = CompressionConfig(merge="weighted", budget=0.5)
    whole = compress(keys, values, scores, is_image, config)
    monkeypatch.setattr(merge_module, "_MAX_BLOCK_ELEMENTS", 4 * whole.num_kept * 5)
    blocked = compress(keys, values, scores, is_image, config)
    torch.testing.assert_close(blocked.keys, whole.keys)
    torch.testing.assert_close(blocked.values, whole.values)


def test_accumulator_rejects_inconsistent_shapes():
    accumulator = AttentionAccumulator(2)
    with pytest.raises(ValueError, match="need keys up to there"):
        accumulator.update(torch.randn(4, 10, 8), torch.randn(2, 15, 8), query_start=10)
    with pytest.raises(ValueError, match="not a multiple"):
        accumulator.update(torch.randn(3, 1, 8), torch.randn(2, 15, 8), query_start=0)
    with pytest.raises(ValueError, match="heads"):
        accumulator.update(torch.randn(4, 1, 8), torch.randn(4, 15, 8), query_start=0)


# Dtypes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 3e-2),
                                             (torch.float16, 4e-3)])
def test_half_precision_inputs(dtype, tolerance):
    generator = torch.Generator().manual_seed(8)
    queries = torch.randn(8, 96, 64, generator=generator)
    keys = torch.randn(2, 96, 64, generator=generator)
    values = torch.randn(2, 96, 64, generator=generator)
    scores = accumulated_attention(queries.to(dtype), keys.to(dtype))
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, accumulated_attention(queries, keys),
                               rtol=tolerance * 4, atol=tolerance * 4)

    is_image = image_mask("middle", 96)
    exact = compress(keys.to(dtype).float(), values.to(dtype).float(), scores, is_image,
                     CompressionConfig())
    out = compress(keys.to(dtype), values.to(dtype), scores, is_image, CompressionConfig())
    assert out.keys.dtype == out.values.dtype == dtype
    assert torch.equal(out.kept, exact.kept)
    torch.testing.assert_close(out.keys.float(), exact.keys, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(out.values.float(), exact.values, rtol=tolerance, atol=tolerance)


# Engine-facing parameters ---------------------------------------------------------------------


def engine_inputs(seed: int, block: int = 8):
    keys, values, scores = layer(seed, length=160)
    is_image = image_mask("middle", 160) | image_mask("many", 160)
    evictable = is_image.view(-1, block).all(dim=1).repeat_interleave(block)
    return keys, values, scores, is_image, evictable


def expected_kept_evictable(config, is_image, evictable, keep_multiple):
    """The documented k, from the layout alone (vector ops, no scores)."""
    length = is_image.shape[0]
    recent = torch.arange(length) >= length - int(config.recent_ratio * length)
    protected = recent | always_kept(config, is_image)  # LOOK-M: recent | text
    important = int(config.budget * length) - int(config.recent_ratio * length)
    selected = max(0, important - int((protected & ~recent).sum()))
    candidates = int((~protected).sum())
    evictable_candidates = int((~protected & evictable).sum())
    share = -(-selected * evictable_candidates // candidates) if candidates else 0
    protected_evictable = int((protected & evictable).sum())
    rounded = -(-(protected_evictable + share) // keep_multiple) * keep_multiple
    return min(rounded, int(evictable.sum())), protected


def assert_engine_rule(out, config, scores, is_image, evictable, keep_multiple):
    """The engine rule: non-evictable kept, the same layout-only k, each head's best candidates."""
    num_heads = out.kept_mask.shape[0]
    k, protected = expected_kept_evictable(config, is_image, evictable, keep_multiple)
    num_evictable = int(evictable.sum())
    assert out.kept_mask[:, ~evictable].all()  # non-evictable positions are always kept
    assert out.kept_mask[:, protected].all()  # and so are the protected ones
    kept_evictable = (out.kept_mask & evictable).sum(dim=1)
    assert (kept_evictable == out.num_kept_evictable).all()  # the same k in every head
    assert out.num_kept_evictable == k
    assert out.num_kept == int((~evictable).sum()) + k
    assert k % keep_multiple == 0 or k == num_evictable
    # The kept evictable candidates of each head are its best-ranked ones.
    rank = selector_for(config).rank(scores, num_heads, is_image.shape[0])
    candidates = evictable & ~protected
    for head in range(num_heads):
        kept = candidates & out.kept_mask[head]
        evicted = candidates & ~out.kept_mask[head]
        if kept.any() and evicted.any():
            assert rank[head, kept].min() > rank[head, evicted].max()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep_multiple", [1, 8, 32])
def test_evictable_positions_and_rounding(method, keep_multiple):
    keys, values, scores, is_image, evictable = engine_inputs(METHODS.index(method))
    config = CompressionConfig(method=method, budget=0.2, recent_ratio=0.1)
    out = compress(keys, values, scores, is_image, config, evictable=evictable,
                   keep_multiple=keep_multiple)
    assert_consistent(out, 160)
    assert_engine_rule(out, config, scores, is_image, evictable, keep_multiple)
    assert out.num_kept_evictable < int(evictable.sum())
    # LOOK-M: its protected text may fill the budget.
    assert out.num_kept_evictable > 0 or always_kept(config, is_image).any()
    # Rounding only keeps more (each head's next-best evictable positions), never other ones.
    unrounded = compress(keys, values, scores, is_image, config, evictable=evictable)
    assert (out.kept_mask >= unrounded.kept_mask).all()
    assert out.num_kept - unrounded.num_kept < keep_multiple


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [0.05, 0.2, 0.6])
@pytest.mark.parametrize("keep_multiple", [1, 7, 16])
def test_engine_rule_holds(method, budget, keep_multiple):
    seed = METHODS.index(method) * 100 + int(budget * 100) + keep_multiple
    keys, values, scores, is_image, evictable = engine_inputs(seed)
    evictable = evictable.clone()
    evictable[40:43] = False  # scattered pinned positions too
    evictable[150:] = True  # and evictable positions in the recent window (protected)
    config = CompressionConfig(method=method, budget=budget, recent_ratio=min(0.1, budget),
                               merge="pivotal")
    out = compress(keys, values, scores, is_image, config, evictable=evictable,
                   keep_multiple=keep_multiple)
    assert_consistent(out, 160)
    assert_engine_rule(out, config, scores, is_image, evictable, keep_multiple)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [0.05, 0.2, 0.6])
@pytest.mark.parametrize("keep_multiple", [1, 8, 16])
def test_kept_evictable_count_does_not_depend_on_scores(method, budget, keep_multiple):
    """k is the same for every layer and tensor-parallel rank: the engine frees shared blocks."""
    seed = METHODS.index(method) * 100 + int(budget * 100) + keep_multiple
    keys, values, scores, is_image, evictable = engine_inputs(seed)
    config = CompressionConfig(method=method, budget=budget, recent_ratio=min(0.1, budget))
    generator = torch.Generator().manual_seed(seed)

    def kept_count(scores, heads=4):
        out = compress(keys[:heads], values[:heads], scores, is_image, config,
                       evictable=evictable, keep_multiple=keep_multiple)
        assert_engine_rule(out, config, scores, is_image, evictable, keep_multiple)
        return out.num_kept, out.num_kept_evictable

    reference = kept_count(scores)
    permuted_all = scores[:, torch.randperm(160, generator=generator)]
    permuted_rows = scores.gather(1, torch.rand(4, 160, generator=generator).argsort(dim=1))
    concentrated = torch.zeros(4, 160)
    concentrated[:, evictable] = 1.0 + torch.rand(4, int(evictable.sum()), generator=generator)
    for other in (permuted_all, permuted_rows, torch.rand(4, 160, generator=generator),
                  100 * torch.rand(4, 160, generator=generator) ** 8, concentrated,
                  scores.flip(1)):
        assert kept_count(other) == reference
    assert kept_count(scores[:1], heads=1) == reference  # one rank's subset of the heads
    assert kept_count(scores[2:], heads=2) == reference


@pytest.mark.parametrize("method", METHODS)
def test_all_evictable_is_the_paper_exactly(method):
    keys, values, scores = layer(12, length=150)
    is_image = image_mask("many", 150)
    config = CompressionConfig(method=method, budget=0.3, merge="pivotal")
    paper = compress(keys, values, scores, is_image, config)
    everything = compress(keys, values, scores, is_image, config,
                          evictable=torch.ones(150, dtype=torch.bool))
    for name in ("kept", "kept_mask", "merge_counts", "keys", "values"):
        assert torch.equal(getattr(everything, name), getattr(paper, name)), name
    assert everything.num_kept == paper.num_kept == paper.num_kept_evictable


def engine_block_layout(block: int = 32, image_len: int = 144, num_images: int = 8):
    """A prompt as the vLLM engine sees it: images at offsets that are not block-aligned."""
    prefix, gap, suffix = 3, 4, 1
    length = prefix + num_images * image_len + (num_images - 1) * gap + suffix
    is_image = torch.zeros(length, dtype=torch.bool)
    starts = [prefix + i * (image_len + gap) for i in range(num_images)]
    for start in starts:
        is_image[start:start + image_len] = True
    assert all(start % block for start in starts)
    recent_start = length - int(0.1 * length)
    # The engine can free whole blocks of image tokens lying before the recent window.
    evictable = torch.zeros(length, dtype=torch.bool)
    for b in range(recent_start // block):
        if is_image[b * block:(b + 1) * block].all():
            evictable[b * block:(b + 1) * block] = True
    return is_image, evictable


def test_engine_blocks_keep_the_image_tokens_the_scores_choose():
    block = 32
    is_image, evictable = engine_block_layout(block)
    length = is_image.shape[0]
    assert 25 <= int((~is_image).sum()) <= 35
    config = CompressionConfig(budget=0.2, recent_ratio=0.1, merge="pivotal")
    recent = torch.arange(length) >= length - int(0.1 * length)
    important = int(0.2 * length) - int(0.1 * length)
    # The hard case: the older positions the engine cannot free outnumber the paper's N.
    assert int((~evictable & ~recent).sum()) > important
    keys, values, scores = layer(13, length=length, head_dim=8)

    out = compress(keys, values, scores, is_image, config, evictable=evictable,
                   keep_multiple=block)

    assert_consistent(out, length)
    assert_engine_rule(out, config, scores, is_image, evictable, block)
    assert out.num_kept_evictable > 0 and out.num_kept_evictable % block == 0
    # Which evictable positions are kept follows the scores: permute them among the evictable
    # positions and the kept set moves with them; how many does not change.
    positions = evictable.nonzero().flatten()
    permuted = scores.clone()
    permuted[:, positions] = scores[:, positions.flip(0)]
    moved = compress(keys, values, permuted, is_image, config, evictable=evictable,
                     keep_multiple=block)
    assert_engine_rule(moved, config, permuted, is_image, evictable, block)
    assert moved.num_kept_evictable == out.num_kept_evictable
    assert not torch.equal(moved.kept_mask & evictable, out.kept_mask & evictable)
    # ...exactly: each head's evictable picks are the mirror images of its earlier ones.
    mirror = torch.empty(length, dtype=torch.long)
    mirror[positions] = positions.flip(0)
    for head in range(4):
        picked = (out.kept_mask[head] & evictable).nonzero().flatten()
        expected = torch.zeros(length, dtype=torch.bool)
        expected[mirror[picked]] = True
        assert torch.equal(moved.kept_mask[head] & evictable, expected)
    # The heads pick different evictable positions (the scores decide, not the layout).
    assert not all(torch.equal(out.kept_mask[0] & evictable, row & evictable)
                   for row in out.kept_mask)


def test_rounding_beyond_the_evictable_count_keeps_everything():
    keys, values, scores, is_image, evictable = engine_inputs(9)
    config = CompressionConfig(method="h2o", budget=0.6)
    unrounded = compress(keys, values, scores, is_image, config, evictable=evictable)
    assert 0 < unrounded.num_kept_evictable < int(evictable.sum())
    out = compress(keys, values, scores, is_image, config, evictable=evictable,
                   keep_multiple=1000)
    assert not out.compressed and out.keys is keys
    assert out.num_kept_evictable == int(evictable.sum())


# Devices -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    generator = torch.Generator().manual_seed(11)
    queries = torch.randn(8, 160, 64, generator=generator)
    keys, values, _ = layer(11, length=160, heads=2, head_dim=64)
    is_image, evictable = engine_inputs(11)[3:]
    config = CompressionConfig(method=method, merge="pivotal", merge_scope="same_modality")

    def run(device):
        scores = accumulated_attention(queries.to(device), keys.to(device))
        return scores, compress(keys.to(device), values.to(device), scores, is_image, config,
                                evictable=evictable, keep_multiple=8)

    cpu_scores, cpu = run("cpu")
    cuda_scores, cuda = run("cuda")
    torch.testing.assert_close(cuda_scores.cpu(), cpu_scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(cuda.kept.cpu(), cpu.kept)
    torch.testing.assert_close(cuda.keys.cpu(), cpu.keys, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cuda.values.cpu(), cpu.values, rtol=1e-4, atol=1e-4)


def test_kernel_choice_is_an_explicit_argument():
    """"torch" / "triton" are obeyed as given; "auto" picks Triton only for CUDA tensors (and
    LOOKM_TRITON=0 turns that off); anything else is refused. Asking for Triton where it cannot
    run fails loudly instead of falling back."""
    from lookm_vllm.core import AttentionAccumulator, accumulated_attention
    from lookm_vllm.core.dispatch import use_triton

    cpu = torch.zeros(1)
    assert (use_triton("torch", cpu), use_triton("triton", cpu), use_triton("auto", cpu)) == \
        (False, True, False)
    with pytest.raises(ValueError, match="kernel must be one of"):
        use_triton("cuda", cpu)
    with pytest.raises(ValueError, match="kernel must be one of"):
        AttentionAccumulator(2, kernel="fast")
    queries, keys = torch.randn(4, 8, 16), torch.randn(2, 8, 16)
    torch.testing.assert_close(accumulated_attention(queries, keys, kernel="torch"),
                               accumulated_attention(queries, keys))
    with pytest.raises((ValueError, RuntimeError, ImportError)):
        accumulated_attention(queries, keys, kernel="triton")   # no GPU, no interpreter


# Budgets as token counts (max_kv_tokens) ------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cap", [20, 33, 64, 120, 500])
def test_max_kv_tokens_is_the_papers_budget_in_tokens(method, cap):
    """Without whole-block rounding a cap of C tokens is the paper's selection at N + M = C
    (the fraction C / L where that is exact), and never keeps more than C unless the protected
    positions alone exceed it."""
    length = 120
    keys, values, scores = layer(METHODS.index(method) + cap)
    is_image = image_mask("many", length)
    config = CompressionConfig(method=method, max_kv_tokens=cap, recent_ratio=0.05)
    out = compress(keys, values, scores, is_image, config)
    assert_consistent(out, length)
    recent = min(int(0.05 * length), cap)
    protected = (torch.arange(length) >= length - recent) | always_kept(config, is_image)
    assert out.num_kept == min(length, max(cap, int(protected.sum())))
    budget = min(1.0, cap / length)
    if int(budget * length) == min(cap, length):  # the equivalent fraction keeps the same set
        fraction = CompressionConfig(method=method, budget=budget, recent_ratio=0.05)
        assert torch.equal(compress(keys, values, scores, is_image, fraction).kept_mask,
                           out.kept_mask)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep_multiple", [1, 8, 32])
@pytest.mark.parametrize("cap", [40, 70, 100, 150])
def test_max_kv_tokens_rounds_down_to_whole_blocks(method, keep_multiple, cap):
    """The engine rule under a cap: whole multiples, rounded DOWN, so kept <= cap whenever the
    non-evictable positions fit; otherwise every evictable position the method may evict goes."""
    keys, values, scores, is_image, evictable = engine_inputs(7)
    length = is_image.shape[0]
    config = CompressionConfig(method=method, max_kv_tokens=cap)
    out = compress(keys, values, scores, is_image, config, evictable=evictable,
                   keep_multiple=keep_multiple)
    assert_consistent(out, length)
    num_fixed = int((~evictable).sum())
    assert out.kept_mask[:, ~evictable].all()
    assert out.num_kept_evictable % keep_multiple == 0 or \
        out.num_kept_evictable == int(evictable.sum())
    if num_fixed <= cap:
        assert out.num_kept <= cap
        assert cap - out.num_kept < keep_multiple or out.num_kept_evictable == \
            expected_kept_evictable_at_cap(config, is_image, evictable, keep_multiple)
    else:
        protected_evictable = int((always_kept(config, is_image) & evictable).sum())
        assert out.num_kept_evictable == -(-protected_evictable // keep_multiple) * keep_multiple


def expected_kept_evictable_at_cap(config, is_image, evictable, keep_multiple):
    """k of the budget rule at the cap's N + M (the cap did not bind)."""
    length = is_image.shape[0]
    total = min(config.max_kv_tokens, length)
    m = min(int(config.recent_ratio * length), total)
    recent = torch.arange(length) >= length - m
    protected = recent | always_kept(config, is_image)
    selected = max(0, total - m - int((protected & ~recent).sum()))
    candidates = int((~protected).sum())
    share = -(-selected * int((~protected & evictable).sum()) // candidates) if candidates else 0
    rounded = -(-(int((protected & evictable).sum()) + share) // keep_multiple) * keep_multiple
    return min(rounded, int(evictable.sum()))


@pytest.mark.parametrize("grouped", [False, True], ids=["all", "groups"])
def test_assign_to_kept_matches_a_brute_force_search(grouped):
    """The blocked, per-group similarity search against one evicted token at a time: the most
    cosine-similar allowed kept token (first of equals), dropped when none is allowed."""
    from lookm_vllm.core import assign_to_kept

    g = torch.Generator().manual_seed(11)
    kept = torch.randn(3, 40, 16, generator=g, dtype=torch.float64)
    evicted = torch.randn(3, 60, 16, generator=g, dtype=torch.float64)
    kept[0, 7] = kept[0, 3]                       # an exact tie: the first one wins
    kept_group = evicted_group = None
    if grouped:  # kept group -1 receives nothing; group 2 has receivers in head 2 only
        kept_group = torch.randint(-1, 2, (3, 40), generator=g)
        kept_group[2, :5] = 2
        evicted_group = torch.randint(0, 3, (3, 60), generator=g)
        evicted_group[1, :4] = -1
    result = assign_to_kept(kept, evicted, kept_group, evicted_group, kernel="torch")
    cos = torch.nn.functional.cosine_similarity(evicted[:, :, None], kept[:, None], dim=-1)
    for h in range(3):
        for j in range(60):
            allowed = torch.ones(40, dtype=torch.bool)
            if grouped:
                allowed = (kept_group[h] == evicted_group[h, j]) & (kept_group[h] >= 0)
            if not allowed.any():
                assert not result.valid[h, j]
                continue
            best = cos[h, j].masked_fill(~allowed, float("-inf"))
            assert result.valid[h, j]
            assert torch.isclose(result.similarity[h, j], best.max(), rtol=0, atol=1e-12)
            # the chosen one is (one of) the best; among exact equals, the first
            chosen = int(result.target[h, j])
            assert allowed[chosen] and torch.isclose(best[chosen], best.max(), atol=1e-12)
            assert chosen == int(torch.nonzero(best >= best[chosen] - 1e-12)[0])
    assert grouped is False or not result.valid[1, :4].any()
