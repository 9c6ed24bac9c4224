"""Contract tests: every private vLLM name the adapter touches, checked against the installed
vLLM. A vLLM upgrade that moves or changes one of them fails here, loudly, before anything else.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

vllm = pytest.importorskip("vllm")


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_pinned_version():
    assert vllm.__version__ == "0.32.0"


def test_connector_hooks_exist_with_expected_signatures():
    from vllm.distributed.kv_transfer.kv_connector.v1 import base

    cls = base.KVConnectorBase_V1
    assert params(cls.__init__) == ["self", "vllm_config", "role", "kv_cache_config"]
    assert params(cls.handle_preemptions) == ["self", "kv_connector_metadata"]
    assert params(cls.build_connector_worker_meta) == ["self"]
    assert params(cls.on_new_request) == ["self", "request"]
    assert params(cls.build_connector_meta) == ["self", "scheduler_output"]
    assert params(cls.update_connector_output) == ["self", "connector_output"]
    assert params(cls.bind_kv_cache_manager) == ["self", "kv_cache_manager"]
    assert params(base.SupportsHMA.request_finished_all_groups) == ["self", "request", "block_ids"]
    assert "aggregate" in base.KVConnectorWorkerMetadata.__abstractmethods__
    assert hasattr(cls, "requires_piecewise_for_cudagraph")
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    assert isinstance(KVConnectorFactory._registry, dict)
    assert params(KVConnectorFactory.register_connector) == ["name", "module_path", "class_name"]


def test_runner_calls_handle_preemptions_before_building_attention_metadata():
    """The plans must reach the worker before ``_build_attention_metadata`` runs."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    source = inspect.getsource(GPUModelRunner.execute_model)
    assert source.index("handle_preemptions(") < source.index("self._build_attention_metadata(")
    assert "num_reqs" in params(GPUModelRunner._build_attention_metadata)
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    assert issubclass(CPUModelRunner, GPUModelRunner)
    # the runner's persistent batch lists request ids in metadata row order
    from vllm.v1.worker.gpu_input_batch import InputBatch

    assert isinstance(inspect.getattr_static(InputBatch, "req_ids"), property)


def test_scheduler_side_names():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
    from vllm.v1.request import Request

    assert params(SingleTypeKVCacheManager._remove_blocks_in_range) == [
        "self", "request_id", "first_block", "last_block"]
    assert "single_type_managers" in inspect.getsource(KVCacheCoordinator.__init__)
    assert "self.coordinator" in inspect.getsource(KVCacheManager.__init__)
    assert hasattr(BlockPool, "get_num_free_blocks")
    fields = {f.name for f in dataclasses.fields(SchedulerOutput)}
    assert {"preempted_req_ids", "num_scheduled_tokens", "finished_req_ids"} <= fields
    assert hasattr(Request, "update_block_hashes")
    init = inspect.getsource(Request.__init__)
    assert "self.cache_salt" in init and "self.block_hashes" in init
    from vllm.v1.core import kv_cache_utils

    # a request's cache salt enters its first block hash (and so every chained hash)
    assert "request.cache_salt" in inspect.getsource(kv_cache_utils)


def test_attention_backend_names():
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    assert {"CPU_ATTN", "FLASH_ATTN"} <= set(AttentionBackendEnum.__members__)
    assert callable(register_backend)
    fields = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    assert {"query_start_loc_cpu", "seq_lens", "seq_lens_cpu_upper_bound", "block_table_tensor",
            "num_reqs"} <= fields
    assert params(cpu_attn.CPUAttentionMetadataBuilder.__init__) == [
        "self", "kv_cache_spec", "layer_names", "vllm_config", "device"]
    assert params(cpu_attn.CPUAttentionMetadataBuilder.build)[:3] == [
        "self", "common_prefix_len", "common_attn_metadata"]
    assert params(cpu_attn.CPUAttentionBackendImpl.forward) == [
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
        "output_scale", "output_block_scale"]
    md_fields = {f.name for f in dataclasses.fields(cpu_attn.CPUAttentionMetadata)}
    assert {"block_table", "seq_lens", "query_start_loc"} <= md_fields


@pytest.mark.parametrize("dtype,head_dim,block_size", [
    (torch.float32, 32, 32), (torch.float32, 80, 32), (torch.float32, 64, 64),
    (torch.float16, 128, 32)])
def test_cpu_attn_cache_layout_matches_reshape_and_cache(dtype, head_dim, block_size):
    """CpuAttnLayout reads exactly what vLLM's CPU kernel wrote (keys transposed per block)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from lookm_vllm.vllm_adapter.kv_layout import CpuAttnLayout

    isa = _get_attn_isa(dtype, block_size, head_dim)
    if isa not in CpuAttnLayout.SUPPORTED_ISAS:
        pytest.skip(f"kernel {isa} is refused by the plugin")
    heads, blocks, tokens = 2, 5, 3 * block_size
    cache = torch.zeros(blocks, heads, block_size, 2 * head_dim, dtype=dtype)
    key_view, value_view = cache.view(blocks, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    key = torch.randn(tokens, heads, head_dim).to(dtype)
    value = torch.randn(tokens, heads, head_dim).to(dtype)
    slots = torch.arange(tokens) + block_size          # blocks 1..3
    ops.cpu_attn_reshape_and_cache(key, value, key_view, value_view, slots, isa)
    keys, values = CpuAttnLayout().split(cache)
    got_k = keys[1:4].permute(1, 0, 2, 3).reshape(heads, tokens, head_dim)
    got_v = values[1:4].permute(1, 0, 2, 3).reshape(heads, tokens, head_dim)
    assert torch.equal(got_k, key.transpose(0, 1))
    assert torch.equal(got_v, value.transpose(0, 1))
    # writing through the views lands where the kernel reads
    keys[2, 1, 3] = 7.0
    assert torch.equal(CpuAttnLayout().split(cache)[0][2, 1, 3], torch.full((head_dim,), 7.0,
                                                                             dtype=dtype))


def test_input_processor_validation_hook_target():
    from vllm.v1.engine.input_processor import InputProcessor

    assert params(InputProcessor._validate_params) == ["self", "params", "supported_tasks"]
    assert "self._validate_params(" in inspect.getsource(InputProcessor.process_inputs)
    from vllm.exceptions import VLLMValidationError

    assert "parameter" in params(VLLMValidationError.__init__)


def test_placeholder_range_and_feature_fields():
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    pr = {f.name for f in dataclasses.fields(PlaceholderRange)}
    assert {"offset", "length", "is_embed"} <= pr
    spec = {f.name for f in dataclasses.fields(MultiModalFeatureSpec)}
    assert {"modality", "mm_position"} <= spec
    # connector.media_spans reads features by these modality names
    import numpy as np
    from vllm.multimodal.parse import ImageProcessorItems, VideoProcessorItems

    assert ImageProcessorItems([np.zeros((4, 4, 3))]).modality == "image"
    assert VideoProcessorItems([np.zeros((2, 4, 4, 3))]).modality == "video"


def test_flash_attention_layout_assumption():
    """FlashAttnLayout: keys then values along the last axis of [blocks, heads, block, 2*d]."""
    from vllm.v1.attention.backends import flash_attn

    source = inspect.getsource(flash_attn.FlashAttentionImpl.forward)
    assert "kv_cache.transpose(1, 2).split(self.head_size, dim=-1)" in source
    assert params(flash_attn.FlashAttentionImpl.forward) == params(
        __import__("vllm.v1.attention.backends.cpu_attn", fromlist=["x"])
        .CPUAttentionBackendImpl.forward)
    assert params(flash_attn.FlashAttentionMetadataBuilder.__init__) == [
        "self", "kv_cache_spec", "layer_names", "vllm_config", "device"]
    fields = {f.name for f in dataclasses.fields(flash_attn.FlashAttentionMetadata)}
    assert {"block_table", "seq_lens", "query_start_loc"} <= fields


def test_worker_side_attention_check_names():
    from vllm.config import CompilationConfig
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backend import AttentionType

    assert "static_forward_context" in {f.name for f in dataclasses.fields(CompilationConfig)}
    assert AttentionType.DECODER == "decoder"
    assert "self.attn_type = attn_type" in inspect.getsource(Attention.__init__)
    assert "self.impl" in inspect.getsource(Attention.__init__)


def _cuda_platform_function(name: str):
    """A module-level function of ``vllm/platforms/cuda.py``, compiled from vLLM's own source.

    That module cannot be imported without CUDA (it loads ``vllm._C_stable_libtorch``), but the
    functions used here are plain Python over vLLM's backend classes."""
    import ast
    import importlib.util

    path = importlib.util.find_spec("vllm.platforms").submodule_search_locations[0] + "/cuda.py"
    tree = ast.parse(open(path).read())
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert len(nodes) == 1, f"vllm/platforms/cuda.py no longer defines {name}"
    namespace: dict = {}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)
    return namespace[name], open(path).read()


def test_cuda_platform_names_and_reimports_our_backends():
    """vLLM's CUDA selector returns ``_backend_cls_path(backend_class)`` and the attention layer
    imports that string with ``resolve_obj_by_qualname``: for every wrapped backend it must be
    the very class registered (a class created inside a function would not import)."""
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from lookm_vllm.vllm_adapter.backends import BACKENDS

    backend_cls_path, source = _cuda_platform_function("_backend_cls_path")
    selector = source[source.index("def get_attn_backend_cls"):]
    assert "return _backend_cls_path(backend_class)" in selector
    assert "return _backend_cls_path(selected_backend_class)" in selector
    for backend in BACKENDS:
        enum = AttentionBackendEnum[backend.name]
        try:
            register_backend(enum, backend.class_path)
            registered = enum.get_class()          # how vLLM loads the registered path
            name = backend_cls_path(registered)    # how the CUDA platform names it
            assert name == backend.class_path
            assert resolve_obj_by_qualname(name) is registered
            assert registered.get_impl_cls().__qualname__.isidentifier()
            assert registered.get_builder_cls().__qualname__.isidentifier()
        finally:
            enum.clear_override()


def test_gpu_runner_hook_points():
    """The GPU (V1) runner and the front end call what the plugin hooks, as on CPU."""
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert params(GPUModelRunner._build_attention_metadata)[:3] == ["self", "num_tokens",
                                                                    "num_reqs"]
    build = inspect.getsource(GPUModelRunner._build_attention_metadata)
    # rows follow input_batch order; the CPU lengths are exact without spec decoding
    assert "seq_lens_cpu_upper_bound = self.optimistic_seq_lens_cpu" in build
    assert "query_start_loc_cpu=self.query_start_loc.cpu" in build
    assert "builder.update_block_table(" in build     # only with >1 KV cache group (refused)
    # the final cudagraph mode is resolved from the builders' support BEFORE they are built
    init_backend = inspect.getsource(GPUModelRunner.initialize_attn_backend)
    assert "builder_cls.get_cudagraph_support(" in inspect.getsource(
        GPUModelRunner._check_and_update_cudagraph_mode)
    assert "_check_and_update_cudagraph_mode(" in init_backend
    init_kv = inspect.getsource(GPUModelRunner.initialize_kv_cache)
    assert init_kv.index("initialize_attn_backend(") < init_kv.index(
        "initialize_metadata_builders(")
    # preserved: the runner splits metadata per micro-batch (refused)
    assert "split_attn_metadata(ubatch_slices" in build
    assert hasattr(gpu_model_runner, "GPUModelRunner")
    from vllm.config import ParallelConfig

    assert isinstance(inspect.getattr_static(ParallelConfig, "use_ubatching"), property)


def test_cudagraph_names():
    from vllm.config import CompilationConfig, CUDAGraphMode
    from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder

    assert params(AttentionMetadataBuilder.get_cudagraph_support) == [
        "vllm_config", "kv_cache_spec"]
    assert AttentionCGSupport.NEVER.value == 0
    for name in ("has_full_cudagraphs", "has_piecewise_cudagraphs"):
        assert callable(getattr(CUDAGraphMode, name))
    assert callable(CompilationConfig.splitting_ops_contain_attention)


def test_quantized_cache_names():
    """The cache dtypes LOOK-M may serve: vLLM's plain-number ones and its fp8 ones (codes with
    per-layer scales); every other quantized type is refused at start."""
    import typing

    from vllm.config.cache import CacheDType
    from vllm.utils.torch_utils import is_quantized_kv_cache

    from lookm_vllm.vllm_adapter.connector import SERVED_CACHE_DTYPES
    from lookm_vllm.vllm_adapter.kv_layout import FP8_FORMATS

    names = set(typing.get_args(CacheDType))
    assert set(SERVED_CACHE_DTYPES) <= names
    assert {n for n in SERVED_CACHE_DTYPES if is_quantized_kv_cache(n)} == set(FP8_FORMATS)


def test_cpu_fp8_cache_names_and_layout():
    """What the fp8 codec relies on, on vLLM-CPU: fp8 caches are uint8 tensors; the layer's
    per-tensor scales are ``_k_scale_float`` / ``_v_scale_float`` (what CPU_ATTN passes its
    kernels); codes sit where CpuAttnLayout says (keys transposed per block); a code decodes to
    its float8 value times the scale (checked on values the format represents exactly, so the
    writer's rounding plays no part)."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.attention import attention
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from lookm_vllm.vllm_adapter.kv_layout import FP8_FORMATS, CpuAttnLayout, Fp8Codec

    assert kv_cache_dtype_str_to_dtype("fp8", None) == torch.uint8
    init = inspect.getsource(attention)
    assert "layer._k_scale_float" in init and "layer._v_scale_float" in init
    impl = inspect.getsource(cpu_attn.CPUAttentionBackendImpl)
    assert "self.is_fp8_kv_cache = is_quantized_kv_cache(kv_cache_dtype)" in impl
    assert "k_scale=layer._k_scale_float" in impl and "layer.isa" in impl
    try:
        isa = _get_attn_isa(torch.float32, 32, 32, "fp8")
    except NotImplementedError as exc:  # needs AVX-512 / AMX
        pytest.skip(str(exc))
    for name, fmt in FP8_FORMATS.items():
        heads, blocks, block_size, head_dim = 2, 3, 32, 32
        cache = torch.zeros(blocks, heads, block_size, 2 * head_dim, dtype=torch.uint8)
        key_view, value_view = cache.view(blocks, heads, 2 * block_size, head_dim).chunk(2, 2)
        k_scale, v_scale = 0.375, 0.25
        codes = torch.randint(0, 120, (2, block_size, heads, head_dim), dtype=torch.uint8)
        exact = codes.view(fmt).float() * torch.tensor([k_scale, v_scale])[:, None, None, None]
        ops.cpu_attn_reshape_and_cache(exact[0], exact[1], key_view, value_view,
                                       torch.arange(block_size) + block_size, isa,
                                       k_scale=k_scale, v_scale=v_scale, kv_cache_dtype=name)
        codec = Fp8Codec(fmt, k_scale, v_scale, quantize=None)
        keys, values = CpuAttnLayout().split(cache)
        assert torch.equal(keys[1].transpose(0, 1), codes[0])          # [bs, H, d]
        assert torch.equal(values[1].transpose(0, 1), codes[1])
        assert torch.equal(codec.decode(keys[1], "key").transpose(0, 1), exact[0])
        assert torch.equal(codec.decode(values[1], "value").transpose(0, 1), exact[1])


def test_prefix_cache_names():
    """What prefix_cache.py and the connector rely on to let compressed requests read the prefix
    cache (docs/engine.md, "Prefix caching with compressed requests")."""
    from vllm.config import CacheConfig
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
    from vllm.v1.request import Request

    from lookm_vllm.vllm_adapter.prefix_cache import rechain_hashes

    # the hasher a request calls when blocks fill up: hashes the blocks after block_hashes,
    # chained from block_hashes[-1]; the lookup reads the request's block_hashes
    init_none_hash(sha256)

    def make(tokens):
        return Request("r", tokens, SamplingParams(), None,
                       block_hasher=get_request_block_hasher(16, sha256))

    plain, salted = make(list(range(100))), make(list(range(100)))
    rechain_hashes(salted, 2, "salt")
    assert salted.block_hashes[:2] == plain.block_hashes[:2] and len(plain.block_hashes) == 6
    assert not set(salted.block_hashes[2:]) & set(plain.block_hashes)
    for req in (plain, salted):
        req.append_output_token_ids(list(range(40)))
    assert len(salted.block_hashes) == len(plain.block_hashes) == 8
    assert not set(salted.block_hashes[2:]) & set(plain.block_hashes)
    assert "request.block_hashes" in inspect.getsource(KVCacheManager.get_computed_blocks)
    assert "self.num_computed_tokens" in inspect.getsource(Request.__init__)
    # private blocks: taken from and returned to the pool; replaced below num_cached_block,
    # which cache_blocks never re-hashes
    assert params(BlockPool.get_new_blocks) == ["self", "num_blocks"]
    assert params(BlockPool.free_blocks) == ["self", "ordered_blocks"]
    init = inspect.getsource(SingleTypeKVCacheManager.__init__)
    assert "self.req_to_blocks" in init and "self.num_cached_block" in init
    assert "num_cached_block" in inspect.getsource(SingleTypeKVCacheManager.cache_blocks)
    assert "enable_prefix_caching" in {f.name for f in dataclasses.fields(CacheConfig)}
    # build_connector_meta runs after the step's allocations and before num_computed_tokens
    # advances; no waiting request is scheduled in a step that preempted one
    schedule = inspect.getsource(Scheduler.schedule)
    assert (schedule.index("allocate_slots(") < schedule.index("_build_kv_connector_meta(")
            < schedule.index("_update_after_schedule(scheduler_output)"))
    assert "if not preempted_reqs" in schedule
    # a waiting request's local lookup reads its block hashes, then the connector's
    # get_num_new_matched_tokens runs (LOOK-M switches the hashes to their published state
    # there), then allocate_slots publishes its new full blocks; lookups happen only while
    # nothing of the request is computed
    lookup = schedule.index("self._get_local_prefix_cache_hit(request)")
    assert "if request.num_computed_tokens == 0:" in schedule[:lookup]
    assert (lookup < schedule.index(".get_num_new_matched_tokens(", lookup)
            < schedule.index("allocate_slots(", lookup))
    assert "get_computed_blocks(request)" in inspect.getsource(
        Scheduler._get_local_prefix_cache_hit)
    assert "request.block_hashes" in inspect.getsource(BlockPool.cache_full_blocks)


def test_a_finished_request_is_freed_before_the_step_connector_output_is_read():
    """Deferred compression runs in the step after the first token; a request that ends in that
    step is freed (``request_finished``) before ``update_connector_output`` reads the step's
    results, so the connector reports it from the plan, recognised by ``num_output_tokens``."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    update = inspect.getsource(Scheduler.update_from_output)
    assert (update.index("self._free_request(request)")
            < update.index("self._update_from_kv_xfer_finished(kv_connector_output)"))
    assert "self.connector.update_connector_output(" in inspect.getsource(
        Scheduler._update_from_kv_xfer_finished)
    request = Request("r", [1, 2, 3], SamplingParams(), None)
    request.append_output_token_ids([4, 5])
    assert request.num_output_tokens == 2
