"""Which implementation runs the core's heavy loops (scoring, merge assignment).

Every core function that can hand its work to the Triton kernels takes an explicit ``kernel``
argument: ``"torch"`` (the reference path, any device), ``"triton"`` (the kernels; they say
clearly when they cannot run on the given tensors) or ``"auto"``, the default: the kernels for
CUDA tensors they support unless the environment sets ``LOOKM_TRITON=0``. The environment is
only ever that default.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Kernel = Literal["auto", "torch", "triton"]
KERNELS: tuple[str, ...] = ("auto", "torch", "triton")


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def use_triton(kernel: Kernel, tensor: Tensor) -> bool:
    """Whether work on ``tensor`` goes to the Triton kernels for the choice ``kernel``."""
    check_kernel(kernel)
    if kernel != "auto":
        return kernel == "triton"
    if not tensor.is_cuda:
        return False
    from lookm_vllm.kernels import triton_dispatch

    return triton_dispatch(tensor)
