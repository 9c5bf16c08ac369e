"""CUDA benchmarks of the empirical optimal denoiser (seed 003): our tiled kernels vs an eager
dense PyTorch composition (cdist, soft-max, matmul: a B x N matrix in memory).

Run on a GPU machine:
``PYTHONPATH=. python -m pytest benchmarks/bench_optimal_denoiser_cuda.py --benchmark-only``.
Everything skips without a CUDA device or without the CUDA kernel in the build.
Sizes (float32): a low-dimensional set (B = 1024 queries, N = 60000, n = 48) and an image-sized
set (B = 128, N = 50000, n = 3072, CIFAR-10-like), both at sigma = 0.5.
"""
from __future__ import annotations

import pytest
import torch

from molrg_ext import _C
from molrg_ext.bench import cuda_synced

if (not torch.cuda.is_available() or not getattr(_C, "built_with_cuda", False)
        or not torch._C._dispatch_has_kernel_for_dispatch_key("molrg::optimal_denoiser", "CUDA")):
    pytest.skip("needs a CUDA device and the optimal_denoiser CUDA kernel",
                allow_module_level=True)

SIZES = {"n48": (1024, 60000, 48), "n3072": (128, 50000, 3072)}
SIGMA = 0.5


def _problem(size, dtype=torch.float32):
    B, N, n = SIZES[size]
    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(N, n, device="cuda", dtype=dtype, generator=g)
    x = X[:B] + SIGMA * torch.randn(B, n, device="cuda", dtype=dtype, generator=g)
    s = torch.ones(B, device="cuda", dtype=dtype)
    gamma = torch.full((B,), SIGMA, device="cuda", dtype=dtype)
    return x, X, s, gamma


def _dense(x, X, s, gamma):
    d2 = torch.cdist(x, X).square()  # s = 1 here
    return torch.softmax(-d2 / (2 * gamma[:, None] ** 2), 1) @ X


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.benchmark(group="cuda-optimal-forward")
def test_forward_ours(benchmark, size):
    x, X, s, gamma = _problem(size)
    benchmark(cuda_synced(lambda: torch.ops.molrg.optimal_denoiser(x, X, s, gamma, 512)))


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.benchmark(group="cuda-optimal-forward")
def test_forward_dense_eager(benchmark, size):
    x, X, s, gamma = _problem(size)
    benchmark(cuda_synced(lambda: _dense(x, X, s, gamma)))


def _grad_step(f, x, X, s, gamma):
    """One forward + backward of sum(f(...)^2) w.r.t. the queries x."""
    x.requires_grad_()
    return lambda: torch.autograd.grad(f(x, X, s, gamma).square().sum(), x)[0]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.benchmark(group="cuda-optimal-fwd-bwd")
def test_fwd_bwd_ours(benchmark, size):
    ours = lambda *a: torch.ops.molrg.optimal_denoiser(*a, 512)[0]  # noqa: E731
    benchmark(cuda_synced(_grad_step(ours, *_problem(size))))


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.benchmark(group="cuda-optimal-fwd-bwd")
def test_fwd_bwd_dense_eager(benchmark, size):
    benchmark(cuda_synced(_grad_step(_dense, *_problem(size))))
