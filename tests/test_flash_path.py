"""The CUDA (FLASH_ATTN) path of the adapter, run on CPU tensors through vLLM's own
FlashAttention-side Python: the LOOK-M builder around ``FlashAttentionMetadataBuilder.build``
(the metadata FlashAttention and FA3's ahead-of-time scheduler receive).
"""

from __future__ import annotations

import pytest
import torch

from lookm_vllm.core import CompressionConfig
from lookm_vllm.vllm_adapter.compaction import HoleMap
from lookm_vllm.vllm_adapter.plan import RequestPlan
from lookm_vllm.vllm_adapter.worker_state import WorkerRequest, WorkerState

vllm = pytest.importorskip("vllm")
BLOCK = 32


@pytest.fixture(scope="module")
def flash_builder(tiny_llava_path):
    """A real ``VllmConfig`` of the tiny LLaVA with LOOK-M on, and the LOOK-M FlashAttention
    builder vLLM's GPU runner would create for it (on the CPU device)."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from lookm_vllm.demo.tiny_models import vllm_engine_kwargs
    from lookm_vllm.vllm_adapter.backends.flash_attn import LookMFlashAttentionBuilder
    from lookm_vllm.vllm_adapter.options import engine_kwargs

    kwargs = vllm_engine_kwargs(tiny_llava_path, block_size=BLOCK) | engine_kwargs()
    config = EngineArgs(**kwargs).create_engine_config()
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32,
                             dtype=torch.bfloat16)
    with set_current_vllm_config(config):
        return LookMFlashAttentionBuilder(spec, [], config, torch.device("cpu"))


def _plan(prompt_len, spans=((4, 900),), budget=0.2):
    return RequestPlan(CompressionConfig(method="lookm", budget=budget), prompt_len, spans)


def test_flash_builder_sees_the_compacted_view(flash_builder, monkeypatch):
    """A batch of an uncompressed decode, a compressed decode and a compressed request still in
    its prefill: FlashAttention's metadata (and FA3's scheduler-metadata inputs) read the
    compressed row without its holes and with its shortened length; the other rows and the
    runner's buffers are untouched; the prefill row becomes scoring work."""
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends import flash_attn

    from lookm_vllm.vllm_adapter import attention

    state = WorkerState(active=True)
    compressed = WorkerRequest(_plan(960))
    compressed.holes = [2, 3, 4, 9, 10]
    compressed.hole_map = HoleMap.from_holes(compressed.holes)
    state.requests = {"compressed": compressed, "prefilling": WorkerRequest(_plan(700))}
    state.step_req_ids = ["plain", "compressed", "prefilling"]
    monkeypatch.setattr(attention, "STATE", state)
    calls = []

    def scheduler_metadata(**kwargs):  # FA3's ahead-of-time scheduler, recorded
        calls.append(kwargs)
        return torch.zeros(8, dtype=torch.int32)

    # imported from vllm_flash_attn on CUDA builds only: absent here, set for the test
    monkeypatch.setattr(flash_attn, "get_scheduler_metadata", scheduler_metadata, raising=False)
    monkeypatch.setattr(flash_builder, "aot_schedule", True)   # as with FA3 (H100/H200)

    # decode (1 token), decode (1 token), prefill chunk of 256 tokens at position 256
    query_start_loc = torch.tensor([0, 1, 2, 258], dtype=torch.int32)
    seq_lens = torch.tensor([300, 1000, 512], dtype=torch.int32)
    width = 40
    block_table = torch.arange(3 * width, dtype=torch.int32).view(3, width) + 1
    runner_table, runner_lens = block_table.clone(), seq_lens.clone()
    cm = CommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc.clone(),
        seq_lens=seq_lens, seq_lens_cpu_upper_bound=seq_lens.clone(), num_reqs=3,
        num_actual_tokens=258, max_query_len=256, max_seq_len=1000,
        block_table_tensor=block_table, slot_mapping=torch.zeros(258, dtype=torch.long))

    metadata = flash_builder.build(0, cm)

    holes = 5 * BLOCK
    assert isinstance(metadata, flash_attn.FlashAttentionMetadata)
    assert metadata.seq_lens.tolist() == [300, 1000 - holes, 512]
    live = [c for c in range(-(-1000 // BLOCK)) if c not in compressed.holes]
    assert metadata.block_table[1, :len(live)].tolist() == block_table[1, live].tolist()
    assert torch.equal(metadata.block_table[0], block_table[0])
    assert torch.equal(metadata.block_table[2], block_table[2])
    assert torch.equal(block_table, runner_table) and torch.equal(seq_lens, runner_lens)
    # FA3's scheduler metadata is planned for the lengths the kernel will read
    (call,) = calls
    assert call["cache_seqlens"].tolist() == metadata.seq_lens.tolist()
    assert call["max_seqlen_k"] >= int(metadata.seq_lens.max())
    assert call["batch_size"] == 3 and call["page_size"] == BLOCK
    assert torch.equal(call["cu_seqlens_q"], query_start_loc)
    assert metadata.scheduler_metadata is not None
    # the prefilling request's chunk is this layer's scoring work
    (work,) = metadata.lookm_work
    assert (work.req_id, work.row, work.token_start, work.position_start, work.num_tokens) == \
        ("prefilling", 2, 2, 256, 256)


def test_flash_builder_is_a_pass_through_without_lookm_requests(flash_builder, monkeypatch):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from lookm_vllm.vllm_adapter import attention

    monkeypatch.setattr(attention, "STATE", WorkerState(active=True))
    lens = torch.tensor([40], dtype=torch.int32)
    table = torch.arange(8, dtype=torch.int32)[None]
    cm = CommonAttentionMetadata(
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        query_start_loc_cpu=torch.tensor([0, 1], dtype=torch.int32), seq_lens=lens,
        seq_lens_cpu_upper_bound=lens, num_reqs=1, num_actual_tokens=1, max_query_len=1,
        max_seq_len=40, block_table_tensor=table, slot_mapping=torch.zeros(1, dtype=torch.long))
    metadata = flash_builder.build(0, cm)
    assert metadata.block_table is table and metadata.seq_lens is lens
    assert not hasattr(metadata, "lookm_work")


def test_flash_builder_defers_compression_to_the_first_decode_step(flash_builder, monkeypatch):
    """A request whose prompt completed in the previous step decodes its first token: the
    FlashAttention metadata already reads its row without the plan's holes (each layer compresses
    before its attention), and the compression gets the runner's uncompacted rows."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from lookm_vllm.vllm_adapter import attention

    state = WorkerState(active=True)
    plan = _plan(960)
    waiting = WorkerRequest(plan)
    waiting.deferred = True
    state.requests = {"waiting": waiting}
    state.step_req_ids = ["plain", "waiting"]
    monkeypatch.setattr(attention, "STATE", state)
    lens = torch.tensor([300, 961], dtype=torch.int32)
    table = torch.arange(2 * 40, dtype=torch.int32).view(2, 40) + 1
    runner_table = table.clone()
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=lens,
        seq_lens_cpu_upper_bound=lens.clone(), num_reqs=2, num_actual_tokens=2, max_query_len=1,
        max_seq_len=961, block_table_tensor=table, slot_mapping=torch.zeros(2, dtype=torch.long))

    metadata = flash_builder.build(0, cm)

    holes = plan.holes(BLOCK)
    assert holes and not waiting.compressed
    assert metadata.seq_lens.tolist() == [300, 961 - len(holes) * BLOCK]
    live = [c for c in range(-(-961 // BLOCK)) if c not in holes]
    assert metadata.block_table[1, :len(live)].tolist() == table[1, live].tolist()
    (item,) = metadata.lookm_deferred
    assert (item.req_id, item.row, item.position_start, item.num_tokens) == ("waiting", 1, 960, 1)
    assert metadata.lookm_source_table is table and torch.equal(table, runner_table)
    assert metadata.lookm_work == []
