"""Benchmark runner: fused ops against their PyTorch peers, printed as a table and saved as JSON.

Used by ``python -m benchmarks``, ``molrg bench`` and the pytest-benchmark files in
``benchmarks/``. Every case is a zero-argument callable built by a ``make_*`` function, so the
pytest files and the table time exactly the same code.

Peers:
* ``eager``: the denoiser written as plain PyTorch (two einsums, soft-max / one-hot) + autograd.
  (``molrg_ext.reference`` uses one three-operand einsum that torch contracts left to right
  through a [B, K, n, d] intermediate; it is an oracle, not a fair speed peer.)
* ``compile``: ``torch.compile`` of the same eager function (inductor).
* ``cupy``: the same math in CuPy on the GPU (``molrg_ext.array_peers``: the gradients written
  out by hand, the Jacobians formed in closed form), when cupy and a GPU are present; the
  pytest-benchmark suites time it (``bench_cuda.py`` against our CUDA kernels), not the CPU table.
* ``eager-loop``: the eager case one unit at a time: the training step instance by instance, the
  Jacobian spectrum sample by sample (``torch.autograd.functional.jacobian`` + ``svdvals``).

Jacobian rows time the singular values of the denoiser's Jacobian per sample
(:func:`molrg_ext.dae_jacobian_spectrum`) against ``svdvals(vmap(jacrev(denoiser)))`` of the same
eager composition (``eager``), its ``torch.compile`` (``compile``) and the per-sample loop.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import array_peers
from .jacobian import dae_jacobian_spectrum
from .ops import subspace_dae
from .posterior import posterior_mean_coefficients
from .reference import masked_bases
from ._args import MODES
from .experiments._common import INDEX_MAX, int_at_least, out_file, threads_int
from .train_step import Levels, train_step

__all__ = [
    "DAE_SHAPES", "TRAIN_SHAPES", "JACOBIAN_SHAPES", "eager_dae", "make_dae_case",
    "make_train_case", "make_jacobian_case", "eager_train_loss",
    "dae_flops", "train_flops", "time_callable", "cuda_synced", "run", "main", "peak_gflops",
    "nominal_peak_gflops",
]

# (n, K, d, B)
DAE_SHAPES = [(48, 2, 6, 1024), (48, 2, 6, 65536), (48, 3, 8, 65536), (3072, 10, 40, 256),
              (3072, 10, 40, 4096)]
# (n, K, d, M, P)
TRAIN_SHAPES = [(48, 2, 6, 1024, 64)]
# (n, K, d, B): the peers form and decompose B dense n x n Jacobians
JACOBIAN_SHAPES = [(48, 2, 6, 256)]


def _masked(U, dims):
    """U with the columns past d_k zeroed; U itself when every d_k is the full width (as in all
    benchmark shapes), so the peers do no needless work."""
    return U if all(d == U.shape[-1] for d in dims) else masked_bases(U, dims)


def eager_dae(x, U, c, phi, dims, mode):
    """Plain PyTorch composition of the denoiser (x [P,B,n], U [P,K,n,d], c/phi [P,B])."""
    Um = _masked(U, dims)
    proj = torch.einsum("pbn,pknd->pbkd", x, Um)
    sq = proj.square().sum(-1)
    if mode == "soft":
        w = torch.softmax(phi[..., None] * sq, dim=-1)
    else:
        w = F.one_hot(sq.argmax(-1), U.shape[1]).to(x.dtype)
    return c[..., None] * torch.einsum("pbkd,pknd->pbn", w[..., None] * proj, Um)


def dae_flops(n, K, d, B, mode="soft"):
    """Useful flops of one fwd+bwd (grad wrt U only): soft 10 n K d per sample (project,
    reconstruct, r = U^T g, dU); hard skips the inactive components except in the projection."""
    D = K * d
    per = 10 * n * D if mode == "soft" else 2 * n * D + 8 * n * d
    return per * B


def train_flops(n, K, d, M, P, mode="hard"):
    """Flops of one fused step: soft, the denoiser's fwd+bwd (10 n K d per sample); hard, the
    clean sample's projection on all K components (the assignment, eq. (17)), then x_t's
    projection, the reconstruction, r = U_k^T g and dU_k on its component only: 2 n K d + 10 n d.
    (Before session 24 the hard count added the clean projection to the denoiser's hard count,
    which projects x_t on all K: 2 n d (K - 1) a sample too many, 14% at (48, 2, 6).)"""
    per = 10 * n * K * d if mode == "soft" else 2 * n * K * d + 10 * n * d
    return per * M * P


def _problem(n, K, d, B, P=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, B, n, generator=g, dtype=dtype)
    U = torch.randn(P, K, n, d, generator=g, dtype=dtype) / math.sqrt(n)
    c = torch.full((P, B), 0.9, dtype=dtype)
    phi = torch.full((P, B), 2.0, dtype=dtype)
    gy = torch.randn(P, B, n, generator=g, dtype=dtype)
    return x, U, c, phi, gy


def make_dae_case(impl: str, n, K, d, B, mode="soft", device="cpu") -> Optional[Callable]:
    """A callable doing one fwd+bwd (grad wrt U) of the denoiser; None when impl is unavailable."""
    x, U, c, phi, gy = (t.to(device) for t in _problem(n, K, d, B))
    dims = [d] * K
    U.requires_grad_()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if impl == "ours":
        fwd = lambda: subspace_dae(x, U, c, phi, None, dims, mode)  # noqa: E731
    elif impl == "eager":
        fwd = lambda: eager_dae(x, U, c, phi, dims, mode)  # noqa: E731
    elif impl == "compile":
        torch._dynamo.reset()  # a fresh cache per shape: no recompile-limit fallback to eager
        cf = torch.compile(eager_dae, dynamic=False)
        fwd = lambda: cf(x, U, c, phi, dims, mode)  # noqa: E731
    elif impl == "cupy":
        return _make_cupy_case(x, U, c, phi, gy, mode)
    else:
        raise ValueError(f"unknown impl {impl!r}")

    def step():
        U.grad = None
        y = fwd()
        y.backward(gy)
        sync()

    return step


def _cupy():
    """The cupy module when it and a CUDA device are present, else None."""
    try:
        import cupy as cp
    except ImportError:
        return None
    return cp if torch.cuda.is_available() else None


def _cupy_case(compute, *tensors):
    """compute(cp, *arrays) on the GPU as a zero-argument callable that synchronises before it
    returns, the tensors copied to CuPy arrays once; None without cupy and a CUDA device."""
    cp = _cupy()
    if cp is None:
        return None
    arrays = [cp.asarray(t.detach().cuda()) for t in tensors]

    def run():
        out = compute(cp, *arrays)
        cp.cuda.Device().synchronize()
        return out

    return run


def _make_cupy_case(x, U, c, phi, gy, mode):
    def step(cp, x, U, c, phi, gy):  # forward + analytic backward wrt U (the kernels' math)
        proj, w, _ = array_peers.dae_forward(cp, x, U, c, phi, mode)
        return array_peers.dae_grad_U(cp, x, U, c, phi, proj, w, gy, mode)

    return _cupy_case(step, x, U, c, phi, gy)


def make_jacobian_case(impl: str, n, K, d, B, mode="soft", device="cpu") -> Callable:
    """A callable returning the singular values [B, ...] of the denoiser's Jacobian wrt x at B
    samples (one instance): impl 'ours' (dae_jacobian_spectrum: min(n, K d) values), 'eager'
    (svdvals of vmap(jacrev) of eager_dae: all n), 'compile' (torch.compile of that) or
    'eager-loop' (autograd.functional.jacobian + svdvals, sample by sample). On CUDA the callable
    synchronises before it returns."""
    x, U, c, phi = (t[0].to(device) for t in _problem(n, K, d, B)[:4])
    dims = [d] * K
    return _synced_on_cuda(_jacobian_case(impl, x, U, c, phi, dims, mode, B), device)


def _jacobian_case(impl, x, U, c, phi, dims, mode, B):
    if impl == "ours":
        return lambda: dae_jacobian_spectrum(x, U, c, phi, dims=dims, mode=mode)
    if impl == "cupy":  # the B Jacobians formed in closed form and decomposed (cupy.linalg.svd)
        return _cupy_case(lambda cp, *a: array_peers.jacobian_spectrum(cp, *a, mode), x, U, c,
                          phi)

    def one(xb, cb, pb):  # the eager denoiser at one sample: [n] -> [n]
        return eager_dae(xb[None, None], U[None], cb[None, None], pb[None, None], dims, mode)[0, 0]

    def batched(x, c, phi):
        return torch.linalg.svdvals(torch.func.vmap(torch.func.jacrev(one))(x, c, phi))

    if impl == "eager":
        return lambda: batched(x, c, phi)
    if impl == "compile":
        torch._dynamo.reset()
        cf = torch.compile(batched, dynamic=False)
        return lambda: cf(x, c, phi)
    if impl == "eager-loop":
        def loop():
            out = []
            for b in range(B):
                J = torch.autograd.functional.jacobian(lambda z: one(z, c[b], phi[b]), x[b],
                                                       vectorize=True)
                out.append(torch.linalg.svdvals(J))
            return torch.stack(out)
        return loop
    raise ValueError(f"unknown impl {impl!r}")


def _levels(L=64, dtype=torch.float64) -> Levels:
    t = torch.linspace(0.02, 1.0, L, dtype=torch.float64)
    s, gamma = torch.ones_like(t), t  # VE-like test levels
    c, phi, _ = posterior_mean_coefficients(s, gamma)
    return Levels(s, gamma, torch.ones_like(t), c, phi, None)


def eager_train_loss(U, X, table, i, lev, eps, dims, mode):
    """The training step's loss in plain PyTorch, summed over instances: X [P, N, n], U
    [P, K, n, d], table [L, 5] (s, gamma, lambda, c, phi), drawn indices i and levels lev [P, M]
    and noise eps [P, M, n]; sum_p mean_m lambda ||x_theta(s x_i + gamma eps) - x_i||^2."""
    n, K = X.shape[-1], U.shape[1]
    x0 = torch.gather(X, 1, i[..., None].expand(-1, -1, n))
    s, gm, lam, c, phi = table[lev].unbind(-1)
    xt = s[..., None] * x0 + gm[..., None] * eps
    Um = _masked(U, dims)
    if mode == "hard":
        with torch.no_grad():  # the assignment (eq. (17)) is not differentiated
            k0 = torch.einsum("pbn,pknd->pbkd", x0, Um).square().sum(-1).argmax(-1)
        proj = torch.einsum("pbn,pknd->pbkd", xt, Um)
        w = F.one_hot(k0, K).to(X.dtype)
    else:
        proj = torch.einsum("pbn,pknd->pbkd", xt, Um)
        w = torch.softmax(phi[..., None] * proj.square().sum(-1), -1)
    y = c[..., None] * torch.einsum("pbkd,pknd->pbn", w[..., None] * proj, Um)
    return (lam * (y - x0).square().sum(-1)).mean(1).sum()


def make_train_case(impl: str, n, K, d, M, P, mode="hard", N=4096,
                    device="cpu") -> Optional[Callable]:
    """One training step for P instances (batch M each); impl 'ours' (fused op), 'eager'
    (randint + randn + gather + denoiser + loss + backward in plain PyTorch, batched over P),
    'compile' (torch.compile of that) or 'eager-loop' (the eager step run instance by instance).
    On CUDA the callable synchronises before it returns."""
    return _synced_on_cuda(_train_case(impl, n, K, d, M, P, mode, N, device), device)


def _synced_on_cuda(case: Optional[Callable], device) -> Optional[Callable]:
    """case, synchronising before it returns on CUDA; None stays None (an unavailable peer, e.g.
    CuPy not installed, which the benchmarks skip)."""
    if case is None or torch.device(device).type != "cuda":
        return case
    return cuda_synced(case)


def _train_case(impl, n, K, d, M, P, mode, N, device):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(P, N, n, generator=g).to(device)
    U0 = (torch.randn(P, K, n, d, generator=g) / math.sqrt(n)).to(device)
    dims = [d] * K
    lv = _levels()
    counter = {"step": 0}
    if impl == "ours":
        def step():
            counter["step"] += 1
            return train_step(X, U0, dims, lv, M, 0, counter["step"], mode)
        return step
    if impl == "cupy":  # randint + standard_normal + the composition, on the GPU
        def step_cupy(cp, X, U, table):
            idx = cp.random.randint(0, N, (P, M))
            lev = cp.random.randint(0, table.shape[0], (P, M))
            eps = cp.random.standard_normal((P, M, n), dtype=cp.float32)
            return array_peers.train_step_arrays(cp, X, U, table, idx, lev, eps, mode)[1]

        return _cupy_case(step_cupy, X, U0, lv.table(torch.float32))
    if impl not in ("eager", "compile", "eager-loop"):
        raise ValueError(f"unknown impl {impl!r}")
    table = lv.table(torch.float32, X.device)
    U = U0.clone().requires_grad_()
    Lv = table.shape[0]

    def loss_fn(U, X, i, lev, eps):
        return eager_train_loss(U, X, table, i, lev, eps, dims, mode)

    if impl == "eager-loop":
        # One instance at a time, the way a single-problem training script runs: P eager steps
        # of batch M (the "per instance-step" peer of the training-step target).
        Us = [U0[p:p + 1].clone().requires_grad_() for p in range(P)]

        def step_loop():
            for p in range(P):
                i = torch.randint(0, N, (1, M), device=X.device)
                lev = torch.randint(0, Lv, (1, M), device=X.device)
                eps = torch.randn(1, M, n, device=X.device)
                Us[p].grad = None
                loss_fn(Us[p], X[p:p + 1], i, lev, eps).backward()
            return Us[-1].grad

        return step_loop
    if impl == "compile":
        torch._dynamo.reset()
    fn = torch.compile(loss_fn, dynamic=False) if impl == "compile" else loss_fn

    def step():
        i = torch.randint(0, N, (P, M), device=X.device)
        lev = torch.randint(0, Lv, (P, M), device=X.device)
        eps = torch.randn(P, M, n, device=X.device)
        U.grad = None
        fn(U, X, i, lev, eps).backward()
        return U.grad

    return step


def cuda_synced(fn: Callable) -> Callable:
    """fn followed by torch.cuda.synchronize(), so a timer sees the kernels finish."""
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def time_callable(fn: Callable, repeats: int = 5, warmup: int = 1, min_time: float = 0.0):
    """Median and min wall time (s) over repeats (each repeat loops until min_time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        k, t0 = 0, time.perf_counter()
        while True:
            fn()
            k += 1
            el = time.perf_counter() - t0
            if el >= min_time:
                break
        times.append(el / k)
    return statistics.median(times), min(times)


def nominal_peak_gflops(threads: Optional[int] = None,
                        cpuinfo: Optional[str] = None) -> Optional[float]:
    """Nominal fp32 FMA peak of `threads` cores (default: torch's thread count): cores x 2 FMA
    units x lanes x 2 flops x the "cpu MHz" of /proc/cpuinfo (or of the text `cpuinfo`: the clock
    the kernel reports now, which on a VM is usually the nominal one), with 16
    lanes where the flags list avx512f and 8 otherwise (AVX2 + FMA assumed). AMD's Zen 4 (family
    25 with avx512f) runs a 512-bit FMA as two 256-bit halves on its two 256-bit units: 8 lanes.
    Boost clocks make the real peak higher; some Intel AVX-512 cores have one 512-bit FMA unit and
    so half this. None when the clock cannot be read."""
    try:
        if cpuinfo is None:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        lines = cpuinfo.splitlines()
        mhz = [float(l.split(":")[1]) for l in lines if l.startswith("cpu MHz")]
    except (OSError, ValueError, IndexError):
        return None
    if not mhz:
        return None

    def field(name):
        return next((l.split(":", 1)[1].strip() for l in lines
                     if l.split(":", 1)[0].strip() == name), "")

    flags = field("flags").split()
    lanes = 16 if "avx512f" in flags else 8
    if field("vendor_id") == "AuthenticAMD" and field("cpu family") == "25":
        lanes = 8
    cores = min(len(mhz), threads or torch.get_num_threads())
    return cores * 2 * lanes * 2 * (sum(mhz) / len(mhz)) / 1000.0


def peak_gflops(size: int = 2048, repeats: int = 12) -> float:
    """Attainable fp32 peak, measured: the best GFLOP/s of a size^3 float32 matrix product
    (torch.mm, i.e. the BLAS) with torch's current thread count. This is what a tuned kernel
    reaches on this machine at this moment, boost clock and neighbours included."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def _row(kind, shape, mode, times, medians, flops):
    ours = times.get("ours")
    row = {"kind": kind, "shape": list(shape), "mode": mode, "seconds": times,
           "median_seconds": medians, "flops": flops,
           "gflops_ours": (flops / ours / 1e9) if ours and flops else None}
    row["speedup"] = {k: v / ours for k, v in times.items() if k != "ours" and v and ours}
    return row


def run(dae_shapes=None, train_shapes=None, peers=("eager", "compile"), modes=("soft",),
        train_modes=("hard", "soft"), repeats=5, out: Optional[str] = None, progress=True,
        jacobian_shapes=None):
    """Time every case; print a table; return (and optionally save) the rows."""
    dae_shapes = DAE_SHAPES if dae_shapes is None else dae_shapes
    train_shapes = TRAIN_SHAPES if train_shapes is None else train_shapes
    jacobian_shapes = JACOBIAN_SHAPES if jacobian_shapes is None else jacobian_shapes
    rows = []
    peak = peak_gflops()
    jobs = [("dae", s, m) for s in dae_shapes for m in modes]
    jobs += [("train", s, m) for s in train_shapes for m in train_modes]
    jobs += [("jacobian", s, "soft") for s in jacobian_shapes]
    try:
        from tqdm import tqdm
        it = tqdm(jobs, desc="bench", disable=not progress)
    except ImportError:
        it = jobs
    for kind, shape, mode in it:
        times, medians = {}, {}
        impls = ("ours", *peers) + (("eager-loop",) if kind != "dae" and "eager" in peers
                                    else ())
        make = {"dae": make_dae_case, "train": make_train_case,
                "jacobian": make_jacobian_case}[kind]
        for impl in impls:
            fn = make(impl, *shape, mode=mode)
            if fn is None:
                continue
            med, best = time_callable(fn, repeats=repeats, warmup=2 if impl == "compile" else 1)
            # the minimum is the least disturbed run on a shared machine; medians are kept too
            times[impl], medians[impl] = best, med
        # the Jacobian rows have no flop count (the op and its peers do different work)
        flops = (dae_flops(*shape, mode) if kind == "dae" else
                 train_flops(*shape, mode) if kind == "train" else None)
        rows.append(_row(kind, shape, mode, times, medians, flops))
    peak = max(peak, peak_gflops())  # measured before and after: the less disturbed of the two
    _print(rows, peak)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        meta = {"machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "peak_gflops_fp32": peak,
                "peak_source": "best 2048^3 float32 torch.mm with these threads",
                "nominal_peak_gflops_fp32": nominal_peak_gflops(),
                "loadavg": os.getloadavg(), "torch": torch.__version__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


def _print(rows, peak):
    peers = sorted({k for r in rows for k in r["seconds"] if k != "ours"})
    print("times: minimum over repeats (ms); train rows are per step of all P instances, "
          "jacobian rows per batch of B samples")
    head = f"{'kind':8} {'shape':24} {'mode':5} {'ours ms':>9} " + " ".join(
        f"{p + ' ms':>11} {'x' + p:>9}" for p in peers) + f" {'GFLOP/s':>8} {'%sgemm':>6}"
    print(head)
    for r in rows:
        t = r["seconds"]
        line = f"{r['kind']:8} {str(tuple(r['shape'])):24} {r['mode']:5} "
        line += f"{1e3 * t['ours']:9.3f} " if "ours" in t else f"{'-':>9} "
        for p in peers:
            if p in t:
                line += f"{1e3 * t[p]:11.3f} {r['speedup'].get(p, float('nan')):9.2f} "
            else:
                line += f"{'-':>11} {'-':>9} "
        g = r["gflops_ours"]
        line += f"{g:8.2f}" if g else f"{'-':>8}"
        line += f" {100 * g / peak:6.0f}" if g and peak else f" {'-':>6}"
        print(line)
    nominal = nominal_peak_gflops()
    print(f"%sgemm: of {peak:.0f} GFLOP/s, the best 2048^3 float32 torch.mm on this machine now "
          f"(nominal FMA peak at the reported clock {nominal or float('nan'):.0f}); "
          f"threads = {torch.get_num_threads()}; loadavg = {os.getloadavg()[0]:.1f}")


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_args(p.parse_args(argv))


def _shapes(text: str) -> list:
    """argparse type of --shapes: "n,K,d,B;n,K,d,B" with ints in [1, 2**31 - 1] (the ops index
    with int32; K d <= n is the ops' check)."""
    import argparse
    out = []
    for sh in text.split(";"):
        try:
            vals = tuple(int(v) for v in sh.split(","))
        except ValueError:
            vals = ()
        if len(vals) != 4 or min(vals) < 1:
            raise argparse.ArgumentTypeError(f"shape {sh!r} is not n,K,d,B with positive ints")
        if max(vals) > INDEX_MAX:
            raise argparse.ArgumentTypeError(f"shape {sh!r} has a size above {INDEX_MAX}")
        out.append(vals)
    return out


def _modes(text: str) -> str:
    """argparse type of --modes: a comma list of denoiser modes, checked before anything is timed
    (kept as the text run_args splits)."""
    import argparse
    bad = [m for m in text.split(",") if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"must be a comma list of {' / '.join(sorted(MODES))}, "
                                         f"got {text!r}")
    return text


def add_arguments(p):
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--repeats", type=int_at_least(1), default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--modes", type=_modes, default="soft", help="denoiser modes, comma separated")
    p.add_argument("--out", type=out_file, default="results/bench.json",
                   help="JSON output path ('' writes none)")
    p.add_argument("--threads", type=threads_int, default=None,
                   help="torch.set_num_threads (at most 4096)")
    p.add_argument("--shapes", type=_shapes, default=None,
                   help="denoiser shapes as n,K,d,B;n,K,d,B (default: the built-in list)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    p.add_argument("--no-jacobian", action="store_true", help="skip the Jacobian-spectrum rows")


def run_args(a):
    peers = ("eager",) if a.no_compile else ("eager", "compile")
    if a.threads:
        torch.set_num_threads(a.threads)
    dae = [DAE_SHAPES[0], DAE_SHAPES[3]] if a.quick else None
    if a.shapes:  # parsed by argparse (_shapes); a string from a caller's own Namespace too
        dae = _shapes(a.shapes) if isinstance(a.shapes, str) else a.shapes
    train = [(48, 2, 6, 256, 8)] if a.quick else None
    if a.no_train:
        train = []
    jac = [(48, 2, 6, 32)] if a.quick else None
    if a.no_jacobian:
        jac = []
    run(dae, train, peers, tuple(a.modes.split(",")), repeats=a.repeats, out=a.out,
        jacobian_shapes=jac)
    return 0
