"""Jacobian spectrum of the subspace denoiser: fused analytic op vs autograd baselines.

Run:  PYTHONPATH=. python -m pytest benchmarks/bench_jacobian.py -p no:cacheprovider \
          --benchmark-json=bench_jacobian.json

Group n=48 (B = 256 samples, the cases of ``molrg_ext.bench.make_jacobian_case``, which the
``python -m benchmarks`` table times too): ``ours`` (``dae_jacobian_spectrum``) against ``eager``
(``svdvals(vmap(jacrev(denoiser)))`` of the plain-PyTorch denoiser), ``compile``
(``torch.compile`` of that), ``eager-loop`` (per-sample ``torch.autograd.functional.jacobian``
+ ``svdvals``) and ``cupy`` (the Jacobians in closed form and ``cupy.linalg.svd``, on the GPU;
skipped without cupy).

Group n=3072 (B = 64): ``ours`` against ``vmap(jacrev)`` of the reference denoiser on one sample
(its 3072 x 3072 Jacobian and SVD take minutes on 2 CPU cores; no compiled peer for the same
reason). Every benchmark there stores ``extra_info["samples"]`` and ``extra_info["per_sample_s"]``
(mean time / samples), so the two are compared per sample.
"""
import pytest
import torch

import molrg_ext as M
from molrg_ext.bench import JACOBIAN_SHAPES, make_jacobian_case
from molrg_ext import reference as ref

SMALL = JACOBIAN_SHAPES[0]  # (n, K, d, B)
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
def large():
    return _problem(**LARGE)


def _subset(p, m):
    x, U, c, phi, dims = p
    return (x[:m].contiguous(), U, c[:m].contiguous(), phi[:m].contiguous(), dims)


@pytest.mark.parametrize("impl", ["ours", "eager", "compile", "eager-loop", "cupy"])
def test_small(benchmark, run_case, impl):
    benchmark.group = "jacobian n={} K={} d={} B={}".format(*SMALL)
    fn = make_jacobian_case(impl, *SMALL)
    if fn is None:
        pytest.skip("cupy and a CUDA device are needed")
    if impl != "ours":  # correctness guard (not timed): the top K d values agree with ours
        sv, ours = torch.as_tensor(fn()).cpu(), make_jacobian_case("ours", *SMALL)()
        torch.testing.assert_close(sv[:, : ours.shape[-1]], ours, rtol=1e-4, atol=1e-4)
    run_case(fn, rounds=2 if impl == "eager-loop" else 10)


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
