"""Whether this process can run the CUDA kernels of an op (tests and benchmarks skip on it)."""
from __future__ import annotations

from typing import Optional

import torch


def cuda_skip_reason(op: str = "subspace_dae") -> Optional[str]:
    """Why the CUDA kernels of ``molrg::<op>`` cannot run here, or None when they can: a CUDA
    device, an extension built with CUDA kernels, and a CUDA kernel registered for the op."""
    from . import _C

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not getattr(_C, "built_with_cuda", False):
        return "molrg_ext._C was built without CUDA kernels (MOLRG_CUDA=OFF or no nvcc)"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"molrg::{op}", "CUDA"):
        return f"no CUDA kernel registered for molrg::{op}"
    return None
