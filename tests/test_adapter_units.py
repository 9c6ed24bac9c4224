"""Unit tests of the engine adapter's shared pieces on plain CPU tensors (no engine started)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lookm_vllm.core import CompressionConfig, compress
from lookm_vllm.vllm_adapter.compaction import (
    compact_prompt,
    compacted_view,
    gather_prompt,
    read_slots,
)
from lookm_vllm.vllm_adapter.kv_layout import CpuAttnLayout, FlashAttnLayout
from lookm_vllm.vllm_adapter.plan import RequestPlan

BS = 8


def make_plan(config=None, prompt_len=100, spans=((5, 45), (50, 90))):
    return RequestPlan(CompressionConfig.parse(config or {"method": "lookm", "budget": 0.2}),
                       prompt_len, spans)


def test_evictable_blocks_are_whole_image_blocks_before_the_recent_window():
    plan = make_plan()                      # recent window: last 10 -> positions >= 90
    # blocks of 8: [8,16) .. [32,40) lie in (5,45); [56,64) .. [80,88) in (50,90)
    assert plan.evictable_blocks(BS) == [1, 2, 3, 4, 7, 8, 9, 10]
    h2o = make_plan({"method": "h2o", "budget": 0.2})
    assert h2o.evictable_blocks(BS) == list(range(90 // BS))
    mask = plan.evictable_mask(BS)
    assert mask.sum() == 8 * BS and mask[8:40].all() and not mask[40:56].any()
    assert RequestPlan.from_dict(plan.to_dict()) == plan


def _paged(layout: str, num_blocks: int, heads: int, dim: int, generator):
    if layout == "cpu":
        cache = torch.randn(num_blocks, heads, BS, 2 * dim, generator=generator)
        return cache, CpuAttnLayout()
    if layout == "flash":       # logical [blocks, heads, block, 2*dim], identity strides
        cache = torch.randn(num_blocks, heads, BS, 2 * dim, generator=generator)
        return cache, FlashAttnLayout()
    # flash, block-position-major memory (vLLM's LBNHC): same logical shape, permuted strides
    physical = torch.randn(num_blocks, BS, heads, 2 * dim, generator=generator)
    return physical.transpose(1, 2), FlashAttnLayout()


@pytest.mark.parametrize("layout", ["cpu", "flash", "flash-nhd"])
def test_layout_views_alias_the_backend_tensor(layout):
    g = torch.Generator().manual_seed(0)
    cache, adapter = _paged(layout, 6, 2, 16, g)
    keys, values = adapter.split(cache)
    assert keys.shape == values.shape == (6, 2, BS, 16)
    keys[3, 1, 5] = 1.5
    values[2, 0, 7] = -2.5
    if layout == "cpu":                     # CPU_ATTN: keys stored transposed per block
        assert (cache.view(6, 2, -1)[3, 1, :BS * 16].view(16, BS)[:, 5] == 1.5).all()
        assert (cache[2, 0, 7, 16:] == -2.5).all()
    else:                                   # what FlashAttentionImpl.forward reads
        key_cache, value_cache = cache.transpose(1, 2).split(16, dim=-1)
        assert (key_cache[3, 5, 1] == 1.5).all() and (value_cache[2, 7, 0] == -2.5).all()


@pytest.mark.parametrize("layout", ["cpu", "flash", "flash-nhd"])
@pytest.mark.parametrize("merge", ["pivotal", "average", "none"])
def test_compact_prompt_writes_compress_output_and_frees_whole_blocks(layout, merge):
    g = torch.Generator().manual_seed(1)
    heads, dim, prompt_len = 2, 16, 100
    cache, adapter = _paged(layout, 20, heads, dim, g)
    key_cache, value_cache = adapter.split(cache)
    row = torch.randperm(20, generator=g)[:13]          # the request's physical blocks
    plan = make_plan({"method": "lookm", "budget": 0.3, "merge": merge})
    keys, values = gather_prompt(key_cache, value_cache, row, prompt_len)
    scores = torch.rand(heads, prompt_len, generator=g)
    expected = compress(keys, values, scores, plan.is_image(), plan.config,
                        evictable=plan.evictable_mask(BS), keep_multiple=BS)

    result = compact_prompt(key_cache, value_cache, row, plan, scores)

    assert result.num_kept == expected.num_kept == prompt_len - len(result.holes) * BS
    assert set(result.holes) <= set(plan.evictable_blocks(BS)) and result.holes
    assert torch.equal(result.kept, expected.kept)
    got_k, got_v = read_slots(key_cache, value_cache, row, result.slots)
    assert torch.equal(got_k, expected.keys) and torch.equal(got_v, expected.values)
    # non-evictable kept positions stay in their own slot; the rest avoid the holes
    evictable = plan.evictable_mask(BS)
    fixed = ~evictable[result.kept]
    assert torch.equal(result.slots[fixed], result.kept[fixed])
    assert not set((result.slots // BS).flatten().tolist()) & set(result.holes)
    # the compacted read view holds exactly the kept entries (in some order) per head
    table, seq_lens = compacted_view(row[None], torch.tensor([prompt_len]), [(0, result.holes)],
                                     BS)
    assert seq_lens.item() == result.num_kept
    view_k, _ = gather_prompt(key_cache, value_cache, table[0], result.num_kept)
    for h in range(heads):
        a = view_k[h][torch.argsort(view_k[h][:, 0])]
        b = expected.keys[h][torch.argsort(expected.keys[h][:, 0])]
        assert torch.equal(a, b)


def test_nothing_to_free_leaves_the_cache_alone():
    g = torch.Generator().manual_seed(2)
    cache, adapter = _paged("cpu", 8, 2, 16, g)
    before = cache.clone()
    key_cache, value_cache = adapter.split(cache)
    plan = make_plan(prompt_len=40, spans=((3, 12),))     # no whole image block
    result = compact_prompt(key_cache, value_cache, torch.arange(5), plan,
                            torch.rand(2, 40, generator=g))
    assert result.holes == [] and result.num_kept == 40
    assert torch.equal(cache, before)


def test_compacted_view_does_not_touch_runner_buffers():
    table = torch.arange(24).view(2, 12)
    seq_lens = torch.tensor([90, 40])
    new_table, new_lens = compacted_view(table, seq_lens, [(0, [2, 3, 7])], BS)
    assert torch.equal(table, torch.arange(24).view(2, 12))
    assert new_lens.tolist() == [90 - 3 * BS, 40]
    assert new_table[0, :9].tolist() == [0, 1, 4, 5, 6, 8, 9, 10, 11]
    assert torch.equal(new_table[1], table[1])


def test_image_spans_follow_is_embed_masks():
    from lookm_vllm.vllm_adapter.connector import image_spans

    pos = SimpleNamespace(offset=10, length=6, is_embed=torch.tensor([0, 1, 1, 0, 1, 1]).bool())
    req = SimpleNamespace(mm_features=[
        SimpleNamespace(modality="image", mm_position=pos),
        SimpleNamespace(modality="image",
                        mm_position=SimpleNamespace(offset=30, length=4, is_embed=None)),
        SimpleNamespace(modality="audio",
                        mm_position=SimpleNamespace(offset=50, length=4, is_embed=None)),
    ])
    assert image_spans(req) == ((11, 13), (14, 16), (30, 34))


def test_admission_validation_messages():
    from vllm.exceptions import VLLMValidationError

    from lookm_vllm.vllm_adapter.validation import validate_extra_args

    validate_extra_args(None, enabled=False)
    validate_extra_args({"kv_compression": {"method": "lookm", "budget": 0.3}}, enabled=True)
    validate_extra_args({"kv_compression": '{"method": "none"}'}, enabled=False)
    with pytest.raises(VLLMValidationError, match="budget"):
        validate_extra_args({"kv_compression": {"budget": 1.5}}, enabled=True)
    with pytest.raises(ValueError, match="budget"):  # offline callers catch a ValueError
        validate_extra_args({"kv_compression": {"budget": "0.2x"}}, enabled=True)
    with pytest.raises(VLLMValidationError, match="method"):
        validate_extra_args({"kv_compression": '{"method": "nope"}'}, enabled=True)
    with pytest.raises(VLLMValidationError, match="recent_ratio"):
        validate_extra_args({"kv_compression": {"budget": 0.1, "recent_ratio": 0.2}}, True)
    with pytest.raises(VLLMValidationError, match="not started with LOOK-M"):
        validate_extra_args({"kv_compression": {"method": "lookm"}}, enabled=False)


def test_engine_options_are_one_source():
    from lookm_vllm.vllm_adapter import options

    kwargs = options.engine_kwargs({"method": "lookm", "budget": 0.1})
    ktc = kwargs["kv_transfer_config"]
    assert ktc["kv_connector"] == options.CONNECTOR_NAME
    assert options.default_config(ktc["kv_connector_extra_config"]).budget == 0.1
    cli = options.engine_cli_args()
    assert cli[0] == "--kv-transfer-config" and options.CONNECTOR_NAME in cli[1]
    enabled = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector="LookMConnector"))
    assert options.lookm_enabled(enabled)
    assert not options.lookm_enabled(SimpleNamespace(kv_transfer_config=None))


def test_plugin_is_registered_as_a_vllm_entry_point():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("lookm") == "lookm_vllm.vllm_adapter.plugin:register"


def _config(**changes):
    model = {"is_encoder_decoder": False, "use_mla": False, "is_hybrid": False}
    parallel = {"pipeline_parallel_size": 1, "decode_context_parallel_size": 1,
                    "prefill_context_parallel_size": 1}
    top = {"speculative_config": None, "use_v2_model_runner": False}
    for key, value in changes.items():
        (model if key in model else parallel if key in parallel else top)[key] = value
    return SimpleNamespace(model_config=SimpleNamespace(**model),
                           parallel_config=SimpleNamespace(**parallel), **top)


class FullAttentionSpec:  # stands in for vLLM's spec class (matched by name)
    pass


class SlidingWindowSpec:
    pass


@pytest.mark.parametrize("change,words", [
    ({"speculative_config": object()}, "speculative decoding"),
    ({"pipeline_parallel_size": 2}, "pipeline parallelism"),
    ({"decode_context_parallel_size": 2}, "context parallelism"),
    ({"is_encoder_decoder": True}, "encoder-decoder"),
    ({"use_mla": True}, "MLA"),
    ({"is_hybrid": True}, "hybrid"),
    ({"use_v2_model_runner": True}, "VLLM_USE_V2_MODEL_RUNNER=0"),
])
def test_unsupported_setups_are_refused_at_start(change, words):
    from lookm_vllm.vllm_adapter.connector import check_supported

    check_supported(_config(), None)
    with pytest.raises(ValueError, match=words):
        check_supported(_config(**change), None)


def test_only_one_full_attention_kv_group_is_supported():
    from lookm_vllm.vllm_adapter.connector import check_supported

    def groups(*specs):
        return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s()) for s in specs])

    check_supported(_config(), groups(FullAttentionSpec))
    for bad in (groups(SlidingWindowSpec), groups(FullAttentionSpec, SlidingWindowSpec)):
        with pytest.raises(ValueError, match="one full-attention group"):
            check_supported(_config(), bad)
