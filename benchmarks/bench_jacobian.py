"""Jacobian spectrum of the subspace denoiser: fused analytic op vs autograd baselines.

Run:  PYTHONPATH=. python -m pytest benchmarks/bench_jacobian.py -p no:cacheprovider \
          --benchmark-json=bench_jacobian.json
Every benchmark stores ``extra_info["samples"]`` (samples per call) and
``extra_info["per_sample_s"]`` (mean time / samples): the slow peers time a subset of the batch and
are compared per sample. Groups: one per shape.

Peers (same denoiser, float32, plain-PyTorch reference implementation):
* ``loop``: per-sample ``torch.autograd.functional.jacobian`` + ``torch.linalg.svdvals``;
* ``vmap``: ``torch.func.vmap(torch.func.jacrev(...))`` over the batch + batched ``svdvals``.
"""
import pytest
import torch

import molrg_ext as M
from molrg_ext import reference as ref

SMALL = dict(n=48, K=2, d=6, B=1024)
LARGE = dict(n=3072, K=4, d=40, B=64)


def _problem(n, K, d, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = M.random_orthonormal(n, K * d, generator=g)
    U = Q.reshape(n, K, d).permute(1, 0, 2).contiguous()  # [K, n, d], mutually orthogonal
    k = torch.randint(0, K, (B,), generator=g)
    sigma = 0.5
    x = torch.einsum("bnd,bd->bn", U[k], torch.randn(B, d, generator=g)) + sigma * torch.randn(
        B, n, generator=g)
    c, phi, bias = M.posterior_mean_coefficients(1.0, torch.full((B,), sigma))
    return x, U, c.float(), phi.float(), [d] * K


def _ours(x, U, c, phi, dims):
    return M.dae_jacobian_spectrum(x, U, c, phi, dims=dims)


def _loop(x, U, c, phi, dims):
    out = []
    for b in range(x.shape[0]):
        def f(z):
            return ref.subspace_dae(z[None], U, c[b:b + 1], phi[b:b + 1], None, dims)[0]

        out.append(torch.linalg.svdvals(torch.autograd.functional.jacobian(f, x[b])))
    return torch.stack(out)


def _vmap(x, U, c, phi, dims):
    def single(xb, cb, pb):
        return ref.subspace_dae(xb[None], U, cb[None], pb[None], None, dims)[0]

    return torch.linalg.svdvals(torch.func.vmap(torch.func.jacrev(single))(x, c, phi))


def _run(benchmark, fn, args, samples, rounds, warmup=1):
    benchmark.extra_info["samples"] = samples
    res = benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=warmup)
    benchmark.extra_info["per_sample_s"] = benchmark.stats.stats.mean / samples
    return res


@pytest.fixture(scope="module")
def small():
    return _problem(**SMALL)


@pytest.fixture(scope="module")
def large():
    return _problem(**LARGE)


def _subset(p, m):
    x, U, c, phi, dims = p
    return (x[:m].contiguous(), U, c[:m].contiguous(), phi[:m].contiguous(), dims)


@pytest.mark.benchmark(group="jacobian n=48 K=2 d=6 B=1024")
def test_small_ours(benchmark, small):
    sv = _run(benchmark, _ours, small, SMALL["B"], rounds=20)
    # correctness guard on a few samples (not timed)
    ref_sv = _vmap(*_subset(small, 8))[:, : sv.shape[-1]]
    torch.testing.assert_close(sv[:8], ref_sv, rtol=1e-4, atol=1e-5)


@pytest.mark.benchmark(group="jacobian n=48 K=2 d=6 B=1024")
def test_small_vmap_jacrev(benchmark, small):
    m = 256
    _run(benchmark, _vmap, _subset(small, m), m, rounds=2, warmup=0)


@pytest.mark.benchmark(group="jacobian n=48 K=2 d=6 B=1024")
def test_small_autograd_loop(benchmark, small):
    m = 16
    _run(benchmark, _loop, _subset(small, m), m, rounds=2, warmup=0)


@pytest.mark.benchmark(group="jacobian n=3072 K=4 d=40 B=64")
def test_large_ours(benchmark, large):
    _run(benchmark, _ours, large, LARGE["B"], rounds=5)


@pytest.mark.benchmark(group="jacobian n=3072 K=4 d=40 B=64")
def test_large_vmap_jacrev(benchmark, large):
    # One sample: its 3072 x 3072 Jacobian and SVD take minutes on 2 CPU cores.
    m = 1
    sv = _run(benchmark, _vmap, _subset(large, m), m, rounds=1, warmup=0)
    ours = _ours(*_subset(large, m))
    torch.testing.assert_close(ours, sv[:, : ours.shape[-1]], rtol=1e-3, atol=1e-4)
