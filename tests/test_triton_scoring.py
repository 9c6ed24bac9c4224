"""Triton kernels (lookm_vllm.kernels) against float64 torch references.

On a GPU machine the kernels run compiled, plus ``gpu`` tests at realistic sizes. Without a GPU
they run on CPU tensors through Triton's interpreter, which must be on (TRITON_INTERPRET=1) when
Triton itself is first imported (its own tl.max, tl.cdiv ... are jit functions too) and at every
launch. So, unless the variable is already set (``TRITON_INTERPRET=1 pytest this_file`` runs them
in-process), the kernel tests run in one pytest subprocess with the variable set
(:func:`test_kernel_tests_in_interpreter_subprocess`), and the rest of the suite never sees it.
Ahead-of-time compilation for sm_80 / sm_90 is checked on CPU too.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lookm_vllm.kernels import triton_merge, triton_scoring

HAS_CUDA = torch.cuda.is_available()

try:
    from lookm_vllm.core.merge import assign_to_kept
    from lookm_vllm.core.scoring import accumulated_attention
except ImportError:  # pragma: no cover - the core is developed alongside
    accumulated_attention = assign_to_kept = None

if HAS_CUDA and triton_scoring.cuda_kernels_usable(torch.zeros(1, device="cuda")):
    DEVICE = "cuda"
elif triton_scoring.interpreter_active():
    DEVICE = "cpu"
else:
    DEVICE = None
# No GPU, interpreter off: the kernel tests run in a subprocess with the interpreter on.
IN_SUBPROCESS = DEVICE is None and triton_scoring.TRITON_AVAILABLE and not HAS_CUDA

needs_kernels = pytest.mark.skipif(
    DEVICE is None,
    reason=(
        "Triton is not installed"
        if not triton_scoring.TRITON_AVAILABLE
        else "run with TRITON_INTERPRET=1 by test_kernel_tests_in_interpreter_subprocess"
        if IN_SUBPROCESS
        else "no usable CUDA GPU (compute capability >= 8.0)"
    ),
)


@pytest.mark.skipif(not IN_SUBPROCESS, reason="the kernel tests run in this process")
def test_kernel_tests_in_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "not interpreter_subprocess and not compile_for and not import_without"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=900, check=False,
    )
    summary = result.stdout[-6000:]
    passed = re.search(r"(\d+) passed", summary)
    assert result.returncode == 0 and passed and int(passed.group(1)) >= 14, summary


def reference_scores(queries, keys, query_start=None, scale=None):
    """Float64 accumulated causal attention and per-query log-sum-exp, materialising L x L."""
    num_q_heads, num_queries, head_dim = queries.shape
    num_kv_heads, num_keys, _ = keys.shape
    group = num_q_heads // num_kv_heads
    query_start = num_keys - num_queries if query_start is None else query_start
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    device = queries.device
    positions = query_start + torch.arange(num_queries, device=device)
    future = torch.arange(num_keys, device=device)[None, :] > positions[:, None]
    scores = torch.zeros(num_kv_heads, num_keys, dtype=torch.float64, device=device)
    lse = torch.empty(num_q_heads, num_queries, dtype=torch.float64, device=device)
    for head in range(num_q_heads):  # one head at a time: L x L float64 per head only
        logits = queries[head].double() @ keys[head // group].double().T * scale
        logits.masked_fill_(future, float("-inf"))
        scores[head // group] += logits.softmax(-1).sum(0)
        lse[head] = torch.logsumexp(logits, -1)
    return scores.cpu(), lse.cpu()


def make_qk(num_q_heads, num_kv_heads, head_dim, num_keys, num_queries, dtype, seed=0):
    """Queries and keys with a shared direction, so attention is peaked as in real models."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(head_dim, generator=gen)
    keys = torch.randn(num_kv_heads, num_keys, head_dim, generator=gen)
    keys += torch.randn(num_kv_heads, num_keys, 1, generator=gen) * direction
    queries = torch.randn(num_q_heads, num_queries, head_dim, generator=gen) + 0.5 * direction
    return queries.to(DEVICE or "cpu", dtype), keys.to(DEVICE or "cpu", dtype)


def test_import_without_triton_or_gpu():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lookm_vllm.kernels as k\n"
        "assert not k.TRITON_AVAILABLE and not k.cuda_kernels_usable(torch.zeros(1))\n"
        "try:\n"
        "    k.triton_accumulated_attention(torch.zeros(1, 1, 64), torch.zeros(1, 1, 64))\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cuda_kernels_not_usable_on_cpu_tensors():
    assert not triton_scoring.cuda_kernels_usable(torch.zeros(2, 3))


CASES = [
    # num_q_heads, num_kv_heads, head_dim, num_keys, num_queries, query_start, dtype
    pytest.param(4, 2, 64, 64, 64, None, torch.float32, id="gqa-full-L64-fp32"),
    pytest.param(8, 8, 80, 150, 150, None, torch.bfloat16, id="mha-full-d80-bf16"),
    pytest.param(4, 2, 80, 200, 37, 100, torch.float16, id="gqa-chunk-mid-d80-fp16"),
    pytest.param(4, 2, 64, 130, 32, None, torch.bfloat16, id="gqa-window32-bf16"),
    pytest.param(8, 8, 64, 97, 20, 41, torch.float32, id="mha-chunk-L97-fp32"),
    pytest.param(4, 1, 128, 75, 75, None, torch.float16, id="mqa-full-d128-fp16"),
]


@needs_kernels
@pytest.mark.parametrize("hq,hkv,d,length,lq,query_start,dtype", CASES)
def test_matches_float64_reference(hq, hkv, d, length, lq, query_start, dtype):
    queries, keys = make_qk(hq, hkv, d, length, lq, dtype)
    scores = triton_scoring.triton_accumulated_attention(queries, keys, query_start)
    expected, expected_lse = reference_scores(queries, keys, query_start)
    assert scores.dtype == torch.float32 and scores.shape == (hkv, length)
    torch.testing.assert_close(scores.double().cpu(), expected, rtol=2e-5, atol=2e-6)
    # Every (query head, query) row distributes a total weight of exactly 1.
    assert scores.sum().item() == pytest.approx(hq * lq, rel=1e-5)
    lse = triton_scoring.triton_query_logsumexp(queries, keys, query_start)
    torch.testing.assert_close(lse.double().cpu(), expected_lse, rtol=1e-5, atol=1e-5)


def _block_configs():
    """The autotuner's configs on a GPU; small, differently shaped tiles in the interpreter."""
    if DEVICE == "cuda":
        pairs = zip(triton_scoring._query_lse_tuned.configs,
                    triton_scoring._key_colsum_tuned.configs, strict=False)
        return [pytest.param(a, b, id=f"cfg{i}") for i, (a, b) in enumerate(pairs)]
    if DEVICE is None:
        return [pytest.param(None, None, id="no-kernels")]
    config = triton_scoring.triton.Config
    return [
        pytest.param(config({"BLOCK_M": m, "BLOCK_N": n}), config({"BLOCK_M": n, "BLOCK_N": m}),
                     id=f"m{m}-n{n}")
        for m, n in [(16, 32), (64, 16), (16, 16)]
    ]


@needs_kernels
@pytest.mark.parametrize("lse_config,colsum_config", _block_configs())
def test_every_block_config(lse_config, colsum_config, monkeypatch):
    monkeypatch.setitem(triton_scoring._FORCED_CONFIGS, "query_lse", lse_config)
    monkeypatch.setitem(triton_scoring._FORCED_CONFIGS, "key_colsum", colsum_config)
    length = 300 if DEVICE == "cuda" else 83
    queries, keys = make_qk(4, 2, 128 if DEVICE == "cuda" else 64, length, length,
                            torch.bfloat16, seed=6)
    for lq, query_start in [(length, 0), (length // 2, length // 3), (5, length - 5)]:
        q = queries[:, query_start : query_start + lq]
        scores = triton_scoring.triton_accumulated_attention(q, keys, query_start)
        expected, _ = reference_scores(q, keys, query_start)
        torch.testing.assert_close(scores.double().cpu(), expected, rtol=2e-5, atol=2e-6)


@needs_kernels
@pytest.mark.skipif(accumulated_attention is None, reason="lookm_vllm.core not available")
def test_matches_core_accumulated_attention():
    queries, keys = make_qk(8, 2, 64, 120, 120, torch.float32, seed=3)
    scores = triton_scoring.triton_accumulated_attention(queries, keys)
    # kernel="torch": the core's reference path, even on CUDA (where "auto" is these kernels)
    torch.testing.assert_close(scores, accumulated_attention(queries, keys, kernel="torch"),
                               rtol=1e-5, atol=1e-6)
    window = triton_scoring.triton_accumulated_attention(queries[:, -16:], keys)
    torch.testing.assert_close(
        window, accumulated_attention(queries[:, -16:], keys, kernel="torch"), rtol=1e-5,
        atol=1e-6
    )


@needs_kernels
@pytest.mark.skipif(accumulated_attention is None, reason="lookm_vllm.core not available")
def test_core_kernel_argument_selects_the_implementation():
    """``kernel="triton"`` runs the kernels from the core API (interpreter on CPU, compiled on
    CUDA) and agrees with ``kernel="torch"``; the environment plays no part."""
    from lookm_vllm.core import AttentionAccumulator

    queries, keys = make_qk(8, 2, 64, 96, 96, torch.float32, seed=4)
    torch.testing.assert_close(accumulated_attention(queries, keys, kernel="triton"),
                               accumulated_attention(queries, keys, kernel="torch"),
                               rtol=1e-5, atol=1e-6)
    chunked = AttentionAccumulator(2, kernel="triton")
    chunked.update(queries[:, :50], keys[:, :50], 0)
    chunked.update(queries[:, 50:], keys, 50)
    torch.testing.assert_close(chunked.scores, accumulated_attention(queries, keys,
                                                                     kernel="torch"),
                               rtol=1e-5, atol=1e-6)
    kept, evicted = keys[:, :30], keys[:, 30:]
    fast = assign_to_kept(kept, evicted, kernel="triton")
    slow = assign_to_kept(kept, evicted, kernel="torch")
    assert (fast.target == slow.target).float().mean() > 0.99


@needs_kernels
def test_chunked_prefill_accumulates_into_out():
    queries, keys = make_qk(4, 2, 64, 150, 150, torch.bfloat16, seed=1)
    buffer = torch.zeros(2, 150, device=keys.device)
    for start, end in [(0, 40), (40, 41), (41, 110), (110, 150)]:
        # Chunk c sees the keys so far; out is a strided view of the final-size buffer.
        out = triton_scoring.triton_accumulated_attention(
            queries[:, start:end], keys[:, :end], start, out=buffer[:, :end]
        )
        assert out.data_ptr() == buffer.data_ptr()
    one_shot = triton_scoring.triton_accumulated_attention(queries, keys)
    torch.testing.assert_close(buffer, one_shot, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_given_lse_skips_pass_one_and_strided_queries():
    queries, keys = make_qk(4, 2, 64, 90, 90, torch.float16, seed=2)
    # A [tokens, heads, d] buffer viewed as [heads, tokens, d], as an engine holds queries.
    strided = queries.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    expected, expected_lse = reference_scores(queries, keys)
    from_lse = triton_scoring.triton_accumulated_attention(
        strided, keys, lse=expected_lse.float().to(keys.device)
    )
    torch.testing.assert_close(from_lse.double().cpu(), expected, rtol=2e-5, atol=2e-6)
    scaled = triton_scoring.triton_accumulated_attention(strided, keys, scale=0.05)
    torch.testing.assert_close(
        scaled.double().cpu(), reference_scores(queries, keys, scale=0.05)[0], rtol=2e-5, atol=2e-6
    )


@needs_kernels
def test_rejects_bad_arguments():
    queries, keys = make_qk(4, 2, 64, 50, 50, torch.float32)
    attention = triton_scoring.triton_accumulated_attention
    with pytest.raises(ValueError, match="multiple"):
        attention(queries[:3], keys)
    with pytest.raises(ValueError, match="positions"):
        attention(queries, keys, query_start=1)
    with pytest.raises(ValueError, match="out"):
        attention(queries, keys, out=torch.zeros(2, 49, device=keys.device))
    with pytest.raises(ValueError, match="dtype"):
        attention(queries.half(), keys)
    empty = attention(queries[:, :0], keys)
    assert empty.shape == (2, 50) and not empty.any()


@needs_kernels
@pytest.mark.skipif(assign_to_kept is None, reason="lookm_vllm.core not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grouped", [False, True], ids=["all", "groups"])
def test_cosine_argmax_matches_assign_to_kept(dtype, grouped):
    gen = torch.Generator().manual_seed(4)
    kept = torch.randn(3, 45, 80, generator=gen).to(DEVICE, dtype)
    evicted = torch.randn(3, 70, 80, generator=gen).to(DEVICE, dtype)
    kept_group = evicted_group = None
    if grouped:  # modality groups; kept group -1 receives nothing; group 7 has no target
        kept_group = torch.randint(-1, 2, (3, 45), generator=gen).to(DEVICE)
        evicted_group = torch.randint(0, 2, (3, 70), generator=gen).to(DEVICE)
        evicted_group[1, :4] = 7
    target, similarity, valid = triton_merge.triton_cosine_argmax(
        kept, evicted, kept_group, evicted_group
    )
    expected = assign_to_kept(kept.double(), evicted.double(), kept_group, evicted_group)
    assert torch.equal(valid.cpu(), expected.valid.cpu())
    assert torch.equal(target.cpu(), expected.target.cpu())
    torch.testing.assert_close(
        similarity[valid].double().cpu(), expected.similarity[expected.valid].cpu(),
        rtol=1e-5, atol=1e-6,
    )


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (compute capability >= 8.0)")
@pytest.mark.parametrize("length", [1000, 4097])
def test_gpu_bf16_realistic_sizes(length):
    queries, keys = make_qk(32, 8, 128, length, length, torch.bfloat16, seed=5)
    scores = triton_scoring.triton_accumulated_attention(queries, keys)
    expected, _ = reference_scores(queries, keys)
    torch.testing.assert_close(scores.double().cpu(), expected, rtol=1e-4, atol=1e-5)
    kept = scores.topk(length // 5, dim=-1).indices.sort(-1).values.cpu()
    expected_kept = expected.topk(length // 5, dim=-1).indices.sort(-1).values
    assert (kept == expected_kept).float().mean() > 0.999


_COMPILE_FOR_GPU = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lookm_vllm.kernels import triton_merge, triton_scoring

POINTERS = {"LSE": "*fp32", "OUT": "*fp32", "INV_E": "*fp32", "INV_K": "*fp32",
            "GROUP_E": "*i32", "GROUP_K": "*i32", "BEST": "*fp32", "BEST_IDX": "*i32"}

def compile_for(kernel, tuned, arch, dtype, constexprs):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name in ("Q", "K", "EVICTED", "KEPT"):
            signature[name] = "*" + dtype
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    config = tuned.configs[0]
    constexprs = {**constexprs, **config.kwargs}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )
    assert compiled.asm["ptx"], (kernel, arch)
    if arch == 90:  # the tensor-core path of Hopper, not a fallback
        assert "wgmma" in compiled.asm["ptx"], kernel

VARIANTS = ((90, "bf16", 128, 4), (90, "fp16", 80, 1), (80, "bf16", 128, 4))
for arch, dtype, head_dim, group in VARIANTS:
    block_d = triton_scoring.block_d(head_dim)
    common = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION="tf32")
    compile_for(triton_scoring._query_lse_kernel, triton_scoring._query_lse_tuned, arch,
                dtype, dict(NUM_Q_HEADS=32, **common))
    compile_for(triton_scoring._key_colsum_kernel, triton_scoring._key_colsum_tuned, arch,
                dtype, dict(NUM_KV_HEADS=32 // group, **common))
    compile_for(triton_merge._cosine_argmax_kernel, triton_merge._cosine_argmax_tuned, arch,
                dtype, dict(HAS_GROUPS=group > 1, HEAD_DIM=head_dim, BLOCK_D=block_d,
                            DOT_PRECISION="tf32"))
print("compiled")
"""


@pytest.mark.skipif(not triton_scoring.TRITON_AVAILABLE, reason="Triton is not installed")
def test_kernels_compile_for_ampere_and_hopper_without_gpu():
    """Ahead-of-time compilation to PTX for sm_80 and sm_90 needs no GPU: it catches kernels the
    interpreter accepts but the compiler rejects, on CPU-only CI."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_GPU], env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
