"""Paired timing of the train_step op: torch.ops.molrg (the working tree's build, as imported by
``import molrg_ext``) against torch.ops.molrg_ref (another build of the extension whose namespace
was renamed with -Dmolrg=molrg_ref, loaded from REF_SO), call by call in one process. Unlike
run.sh, which times train_block alone, this includes everything the op does per call: the checks,
packing the bases, the parallel regions, the gradient and loss outputs.

Usage: python benchmarks/paired/op_pair.py REF_SO [rounds] [M] [P]   (torch threads: 2)
Prints, per mode, whether the two builds agree (gradients bit for bit, loss to 1e-5) and the
median and quartiles of the per-pair time ratios (this build / ref).
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
    torch.set_num_threads(2)
    torch.ops.load_library(ref_so)
    g = torch.Generator().manual_seed(0)
    N, n, K, d = 4096, 48, 2, 6
    X = torch.randn(P, N, n, generator=g)
    U = torch.randn(P, K, n, d, generator=g) / n ** 0.5
    table = _levels().table(torch.float32)
    for mode, name in ((1, "hard"), (0, "soft")):
        def ours(s):
            return torch.ops.molrg.train_step(X, U, table, None, [d] * K, M, 0, s, mode)

        def ref(s):
            return torch.ops.molrg_ref.train_step(X, U, table, None, [d] * K, M, 0, s, mode)

        a, b = ref(1), ours(1)
        rel = ((a[0] - b[0]).abs() / a[0].abs().clamp_min(1e-30)).max().item()
        same = torch.equal(a[1], b[1]) and rel <= 1e-5
        print(f"{name}: outputs {'agree' if same else 'DIFFER'} (gradients "
              f"{'bit-identical' if torch.equal(a[1], b[1]) else 'differ'}, loss max rel diff "
              f"{rel:.2g})")
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
        print(f"{name} M={M} P={P}: ref median {q(t_ref, .5) * 1e3:.2f} ms | this build median "
              f"{q(t_ours, .5) * 1e3:.2f} ms | this/ref median {q(ratio, .5):.3f} (quartiles "
              f"{q(ratio, .25):.3f}, {q(ratio, .75):.3f}) over {rounds} pairs")


if __name__ == "__main__":
    main(sys.argv)
