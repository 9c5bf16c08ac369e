"""Empirical optimal (multi-delta) denoiser: the fused tiled op vs the eager soft-max composition vs
torch.compile of that composition (CPU), forward and forward+backward, one pytest-benchmark group
per shape; plus the peak extra memory of the fused op vs eager at a size where eager needs a
B x N matrix of ~1 GB. Run:

    PYTHONPATH=. python -m pytest benchmarks/bench_optimal_denoiser.py -p no:cacheprovider
    PYTHONPATH=. python benchmarks/bench_optimal_denoiser.py     # the memory table only

Sizes: B queries x N training points in n dimensions (float32), sigma = 1 (EDM mid-range), queries
= training points + unit noise. The eager peer materialises B x N distances and weights; the fused
op keeps one tile of 64 x 512 logits per thread.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from molrg_ext.hidden_gaussian import optimal_denoiser

SIZES = [(256, 2000, 64), (1024, 10000, 64), (256, 50000, 192)]
MEMORY_SIZE = (4096, 60000, 64)  # eager: one B x N float32 matrix = 983 MB
IMPLS = ["fused", "eager", "compiled"]


def eager_optimal(x, X, sigma):
    d2 = torch.cdist(x, X).square()
    return torch.softmax(-d2 / (2 * sigma * sigma), dim=1) @ X


_compiled = torch.compile(eager_optimal, dynamic=False)
_FNS = {"fused": optimal_denoiser, "eager": eager_optimal, "compiled": _compiled}


def _data(B, N, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g)
    x = X[torch.randint(0, N, (B,), generator=g)] + torch.randn(B, n, generator=g)
    return x, X


def _check(y, x, X):
    """Every implementation must agree with a float64 evaluation (first 64 queries)."""
    ref = eager_optimal(x[:64].double(), X.double(), 1.0)
    err = (y[:64].double() - ref).abs().max().item()
    assert err < 1e-3, err


def _shape_id(s):
    return "B{}-N{}-n{}".format(*s)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SIZES, ids=_shape_id)
def test_forward(benchmark, run_case, shape, impl):
    B, N, n = shape
    x, X = _data(B, N, n)
    fn = _FNS[impl]
    _check(fn(x, X, 1.0), x, X)  # also the warm-up (compilation)
    benchmark.group = f"optimal denoiser forward B={B} N={N} n={n}"
    run_case(lambda: fn(x, X, 1.0), rounds=30 if B * N * n < 10**8 else 5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SIZES, ids=_shape_id)
def test_forward_backward(benchmark, run_case, shape, impl):
    B, N, n = shape
    x, X = _data(B, N, n)
    fn = _FNS[impl]
    v = torch.randn(B, n, generator=torch.Generator().manual_seed(1))

    def step():
        xr = x.clone().requires_grad_()
        y = fn(xr, X, 1.0)
        (g,) = torch.autograd.grad(y, xr, v)
        return y, g

    y, _ = step()  # warm-up (compilation)
    _check(y.detach(), x, X)
    benchmark.group = f"optimal denoiser forward+backward B={B} N={N} n={n}"
    run_case(step, rounds=20 if B * N * n < 10**8 else 3)


# ------------------------------------------------------------------------------- peak memory
# Measured in a fresh interpreter: the growth of the resident-set high-water mark (ru_maxrss) over
# one call, after a smaller warm-up call (which starts the threads and BLAS buffers) and with the
# inputs already allocated. It counts everything the
# call allocates (torch tensors, the kernel's own scratch, BLAS buffers), which torch.profiler's
# memory events would not (they see only the c10 allocator).
_MEMORY_CHILD = r"""
import resource, sys, torch
sys.path.insert(0, {root!r})
from benchmarks.bench_optimal_denoiser import _FNS, _data
impl, B, N, n, backward = {impl!r}, {B}, {N}, {n}, {backward}
fn = _FNS[impl]
x, X = _data(B, N, n)
v = torch.randn(B, n)
def call(x, X, v):
    if not backward:
        return fn(x, X, 1.0)
    xr = x.clone().requires_grad_()
    return torch.autograd.grad(fn(xr, X, 1.0), xr, v)[0]
call(x[:256], X[:4096], v[:256])  # warm-up: threads, BLAS buffers, tile scratch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = call(x, X, v)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024)
"""


def peak_extra_bytes(impl, B, N, n, backward=False):
    """Peak extra resident memory (bytes) of one call of `impl` (fused or eager)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _MEMORY_CHILD.format(root=root, impl=impl, B=B, N=N, n=n, backward=backward)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root})
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_peak_memory(benchmark, impl, backward):
    """Records peak extra MiB in extra_info (the time is that of the whole child process)."""
    B, N, n = MEMORY_SIZE
    result = {}

    def run():
        result["bytes"] = peak_extra_bytes(impl, B, N, n, backward)

    benchmark.group = f"optimal denoiser peak memory B={B} N={N} n={n}"
    benchmark.pedantic(run, rounds=1, iterations=1)
    mib = result["bytes"] / 2**20
    benchmark.extra_info["peak_extra_MiB"] = round(mib, 1)
    bxn = B * N * 4 / 2**20
    if impl == "fused":
        assert mib < 0.1 * bxn, mib  # no B x N matrix
    else:
        assert mib >= bxn, mib  # the measurement sees eager's B x N matrix


def memory_table():
    B, N, n = MEMORY_SIZE
    rows = []
    for backward in (False, True):
        for impl in ("fused", "eager"):
            mib = peak_extra_bytes(impl, B, N, n, backward) / 2**20
            rows.append({"impl": impl, "pass": "fwd+bwd" if backward else "fwd",
                         "B": B, "N": N, "n": n, "peak_extra_MiB": round(mib, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    memory_table()
