"""Paired timing of the extension's ops: torch.ops.molrg (the working tree's build, as imported by
``import molrg_ext``) against torch.ops.molrg_ref (another build of the extension whose namespace
was renamed with -Dmolrg=molrg_ref, loaded from REF_SO), call by call in one process. Unlike
run.sh, which times train_block alone, this includes everything the op does per call: the checks,
packing the bases, the parallel regions, the gradient and loss outputs.

Usage: python benchmarks/paired/op_pair.py REF_SO [rounds] [M] [P] [OP] [SHAPE]   (threads: 2)
OP = train (default): the training step, M slots for each of P instances, N = 4096 rows each.
OP = dae: the denoiser's forward and backward ops (subspace_dae, then subspace_dae_backward for
dU, as autograd calls them), M samples for each of P instances. SHAPE for both: n,K,d (default
48,2,6).
OP = optimal: the empirical optimal denoiser's forward and backward ops (optimal_denoiser, then
optimal_denoiser_backward) on B queries against N training points in n dimensions: SHAPE is
B,N,n (default 1024,10000,64; M and P are not used), sigma = 1, block 512.
Prints, per mode, whether the two builds agree (train: gradients bit for bit, loss to 1e-5;
dae: y bit for bit, dU to 1e-5) and the median and quartiles of the per-pair time ratios (this
build / ref). optimal has one mode; its y and dx are compared to 1e-5 of their largest entries.
"""
import sys
import time

import torch

import molrg_ext  # noqa: F401  (registers torch.ops.molrg.*)
from molrg_ext.bench import _levels


def main(argv):
    ref_so = argv[1]
    rounds = int(argv[2]) if len(argv) > 2 else 40
    M = int(argv[3]) if len(argv) > 3 else 1024
    P = int(argv[4]) if len(argv) > 4 else 64
    op = argv[5] if len(argv) > 5 else "train"
    if op not in ("train", "dae", "optimal"):
        raise SystemExit(f"op_pair.py: OP must be train, dae or optimal, got {op!r}")
    torch.set_num_threads(2)
    torch.ops.load_library(ref_so)
    g = torch.Generator().manual_seed(0)
    if op == "optimal":
        shape = argv[6] if len(argv) > 6 else "1024,10000,64"
        return pair_optimal(rounds, *(int(v) for v in shape.split(",")), g)
    n, K, d = (int(v) for v in (argv[6] if len(argv) > 6 else "48,2,6").split(","))
    N = 4096
    dims = [d] * K
    U = torch.randn(P, K, n, d, generator=g) / n ** 0.5
    if op == "train":
        X = torch.randn(P, N, n, generator=g)
        table = _levels().table(torch.float32)
    else:
        x, gy = torch.randn(P, M, n, generator=g), torch.randn(P, M, n, generator=g)
        c, phi = torch.full((P, M), 0.9), torch.full((P, M), 2.0)
    for mode, name in ((1, "hard"), (0, "soft")):
        def call(ns, s):
            if op == "train":
                return ns.train_step(X, U, table, None, dims, M, 0, s, mode)
            # below the Autograd key: each build's own CPU kernels. Through it, a reference
            # build from before its autograd kernel named the ops by its own namespace (that is,
            # between 2cc7587 and the fix) ran this build's forward, as torch.ops.molrg.
            with torch._C._AutoDispatchBelowAutograd():
                y, proj, w = ns.subspace_dae(x, U, c, phi, None, None, dims, mode)
                return y, ns.subspace_dae_backward(gy, x, U, c, phi, proj, w, dims, mode, False,
                                                   True)[1]

        def ours(s):
            return call(torch.ops.molrg, s)

        def ref(s):
            return call(torch.ops.molrg_ref, s)

        a, b = ref(1), ours(1)
        # train: (loss, grad), the gradients bit for bit and the loss per instance to 1e-5;
        # dae: (y, dU), y bit for bit and dU against its largest entry (sums of M terms each,
        # which a change of summation order moves in the last bits)
        if op == "train":
            exact, rel = 1, ((a[0] - b[0]).abs() / a[0].abs().clamp_min(1e-30)).max().item()
        else:
            exact, rel = 0, ((a[1] - b[1]).abs().max() / a[1].abs().max().clamp_min(1e-30)).item()
        bits = torch.equal(a[exact], b[exact])
        same = bits and rel <= 1e-5
        names = ("gradients", "loss") if op == "train" else ("y", "dU")
        # how far apart when not bit for bit: against the largest entry (a cancelling sum's
        # rounding is large elementwise but not at the array's scale)
        scale = (a[exact] - b[exact]).abs().max() / a[exact].abs().max().clamp_min(1e-30)
        how = "bit-identical" if bits else f"differ by {scale.item():.2g} of the largest"
        print(f"{name}: outputs {'agree' if same else 'DIFFER'} ({names[0]} {how}, "
              f"{names[1]} max rel diff {rel:.2g})")
        report(f"{name} {op} M={M} P={P}", ours, ref, rounds)

def report(label, ours, ref, rounds):
    """Times ours(s) and ref(s) call by call (alternating which goes first) and prints the
    medians and the quartiles of the per-pair ratios."""
    t_ref, t_ours, ratio = [], [], []
    for s in range(rounds):
        t = {}
        for f in ((ours, ref) if s % 2 else (ref, ours)):
            t0 = time.perf_counter()
            f(s + 2)
            t[f] = time.perf_counter() - t0
        t_ref.append(t[ref])
        t_ours.append(t[ours])
        ratio.append(t[ours] / t[ref])
    for v in (t_ref, t_ours, ratio):
        v.sort()
    q = lambda v, f: v[int(f * (len(v) - 1))]  # noqa: E731
    print(f"{label}: ref median {q(t_ref, .5) * 1e3:.2f} ms | this build median "
          f"{q(t_ours, .5) * 1e3:.2f} ms | this/ref median {q(ratio, .5):.3f} (quartiles "
          f"{q(ratio, .25):.3f}, {q(ratio, .75):.3f}) over {rounds} pairs")


def pair_optimal(rounds, B, N, n, g):
    """The optimal denoiser's forward and backward, as autograd calls them (both builds' own
    CPU kernels, below the Autograd key)."""
    X = torch.randn(N, n, generator=g)
    x = X[torch.randint(0, N, (B,), generator=g)] + torch.randn(B, n, generator=g)
    gy = torch.randn(B, n, generator=g)
    s, gamma = torch.ones(B), torch.ones(B)

    def call(ns):
        with torch._C._AutoDispatchBelowAutograd():
            y, lse = ns.optimal_denoiser(x, X, s, gamma, 512)
            return y, ns.optimal_denoiser_backward(gy, x, X, s, gamma, y, lse)

    a, b = call(torch.ops.molrg_ref), call(torch.ops.molrg)
    rel = [((u - v).abs().max() / u.abs().max().clamp_min(1e-30)).item() for u, v in zip(a, b)]
    bits = all(torch.equal(u, v) for u, v in zip(a, b))
    how = "bit-identical" if bits else f"y, dx differ by {rel[0]:.2g}, {rel[1]:.2g} of the largest"
    print(f"optimal: outputs {'agree' if max(rel) <= 1e-5 else 'DIFFER'} ({how})")
    report(f"optimal B={B} N={N} n={n}", lambda _: call(torch.ops.molrg),
           lambda _: call(torch.ops.molrg_ref), rounds)


if __name__ == "__main__":
    main(sys.argv)
