"""GPU kernels for LOOK-M (Triton). Importable without a GPU or Triton: check the predicates.

``TRITON_AVAILABLE`` says whether Triton is installed; :func:`cuda_kernels_usable` whether a given
tensor can be handed to the compiled kernels. The pure-torch algorithm in :mod:`lookm_vllm.core`
is the reference these kernels must match.
"""

from .triton_merge import triton_cosine_argmax
from .triton_scoring import (
    TRITON_AVAILABLE,
    cuda_kernels_usable,
    interpreter_active,
    triton_accumulated_attention,
    triton_dispatch,
    triton_query_logsumexp,
)

__all__ = [
    "TRITON_AVAILABLE",
    "cuda_kernels_usable",
    "interpreter_active",
    "triton_accumulated_attention",
    "triton_cosine_argmax",
    "triton_dispatch",
    "triton_query_logsumexp",
]
