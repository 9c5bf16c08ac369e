"""Empirical optimal (multi-delta) denoiser: fused streaming op vs eager soft-max composition vs
torch.compile of that composition (CPU). Run:

    PYTHONPATH=. python -m pytest benchmarks/bench_optimal_denoiser.py -p no:cacheprovider

Sizes: B queries x N training points in n dimensions (float32), sigma = 1 (EDM mid-range).
The eager peer materialises the B x N distance matrix; the fused op streams over training points.
"""
import pytest
import torch

from molrg_ext.hidden_gaussian import optimal_denoiser

SIZES = [(256, 2000, 64), (64, 8000, 48)]


def eager_optimal(x, X, sigma):
    d2 = torch.cdist(x, X).square()
    return torch.softmax(-d2 / (2 * sigma * sigma), dim=1) @ X


_compiled = torch.compile(eager_optimal, dynamic=False)


def _data(B, N, n):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, n, generator=g)
    x = X[torch.randint(0, N, (B,), generator=g)] + torch.randn(B, n, generator=g)
    return x, X


@pytest.mark.parametrize("B,N,n", SIZES)
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
def test_forward(benchmark, impl, B, N, n):
    x, X = _data(B, N, n)
    fn = {"fused": optimal_denoiser, "eager": eager_optimal, "compiled": _compiled}[impl]
    ref = eager_optimal(x.double(), X.double(), 1.0)
    fn(x, X, 1.0)  # warm-up (compilation)
    benchmark.group = f"forward B={B} N={N} n={n}"
    y = benchmark(fn, x, X, 1.0)
    assert (y.double() - ref).abs().max() < 1e-3


@pytest.mark.parametrize("B,N,n", SIZES[:1])
@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_forward_backward(benchmark, impl, B, N, n):
    x, X = _data(B, N, n)
    fn = {"fused": optimal_denoiser, "eager": eager_optimal}[impl]
    v = torch.randn(B, n)

    def step():
        xr = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(xr, X, 1.0), xr, v)
        return g

    benchmark.group = f"forward+backward B={B} N={N} n={n}"
    benchmark(step)
