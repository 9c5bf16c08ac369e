"""``molrg phase-transition``: Fig. 4 / Fig. 8 of the paper.

For every cell (N_k, d) of the grid, P = ``--instances`` MoLRG problems (n = 48, K equal
components of dimension d, exactly N_k samples each, orthogonal bases) are solved by one method and
the success rate ``mean_p [dist_p <= 0.5]`` is recorded (distance of Section E.1, spectral norm).

Methods: ``svd`` (K = 1 only, Theorem 1), ``kss`` (K-subspaces, problem (18)), ``ensc``
(elastic-net subspace clustering), ``sgd-hard`` / ``sgd-soft`` (Algorithm 1 on the denoiser (16) /
(9); all P instances of a cell are trained together as one batched problem). ``--all`` runs
``sgd-hard`` for K = 2, 3 as the project's specification asks; the paper's Section 4.1 text names the
soft-max denoiser (9) for Fig. 4 (``--method sgd-soft``; identical for K = 1). With the quick
budget the soft one succeeds less often near the threshold (K = 2, d = 4, N_k = 6 / 8: 0.3 / 0.4
against 0.8 / 1.0 for hard, lr 0.5).

Presets (SGD settings; the baselines are the same in both):

* ``paper`` -- Section E.1 as written: 64 levels; K = 1: lr 1e-4, batch 128 N_k, J = 1e4;
  K >= 2: lr 2e-5, batch 1024, J = 1e5; plain SGD on the batch mean (Algorithm 1's eta / M sum),
  paper initialisation (48) for K >= 2 (``--init`` overrides); the paper states no loss weight or
  schedule, so lambda_t = 1 and VP. Far too slow for this 2-core machine (hours per grid), and
  as written it barely moves: K = 2, d = 4, N_k = 8 goes from distance 0.95 to 0.90 over the
  whole run (success 0 where the theory and K-subspaces give 1); K = 1, d = 3, N_k = 6 from a
  random start ends at 0.99-1.0. The same data with the step multiplied by the batch size (a sum
  over the batch instead of its mean) reaches 0.04-0.11 in 3000 steps, so the paper's runs most
  likely took a much larger effective step than the text says. (Initialisation (48) itself
  starts at distance 0.85-0.95, above the 0.5 threshold.)
* ``quick`` -- reduced budget: SGD lr 0.2, batch 128, at most 1000 steps with early stop (projector
  change < 1e-3 over 20 steps), VP schedule, QR retraction. lr 0.2 x 1000 steps follows the
  threshold more closely than the earlier lr 0.5 x 300, whose step noise left distances at
  0.2-0.4 (K = 1, d = 4, N_k = 6 / 8: success 0.85 / 0.90 -> 1.00 / 1.00; K = 1, d = 8, N_k = 10 /
  12: 0.45 / 0.85 -> 0.70 / 1.00; K = 3, d = 3, N_k = 4: 0.70 -> 1.00), about 0.5 s a cell.

Both presets train with the fused ``molrg_ext.train_step`` op when the build has it (about 3x
faster than the autograd engine here), else with autograd. The paper's lr / J give a product lr J
  of 1 (K = 1) or 2 (K = 2), which with the uniform weight lambda_t = 1 moves the bases too
  little (above); the quick preset's lr 0.2 x 1000 steps is a "training time" of 200.

Outputs in ``--out``: ``cells/K{K}_{method}_d{d}_N{N}.json`` (one per cell; finished cells are
skipped on a rerun), ``K{K}_{method}.csv`` and ``K{K}_{method}.png`` (heat map with the line
N_k = d). An ``ensc`` cell also records ``isolated_samples``, per instance the samples that
elastic net left without a coefficient (no edge in the affinity, an arbitrary label): below the
threshold samples are nearly orthogonal, and EnSC's warning about them is not repeated there.
``unconverged_fits`` likewise counts, per instance, the elastic-net fits that hit max_iter.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import time
from pathlib import Path

import torch

from .._warnings import ignoring
from ._common import (INDEX_MAX, finite_float, int_at_least, out_dir, seed_int,
                      subplots, threads_int, write_json)

METHODS = ("svd", "kss", "ensc", "sgd-hard", "sgd-soft")
N_AMBIENT = 48
GRID_MAX = 10_000  # values of one grid axis (the paper's have 15)


def parse_range(text: str, hi: int = INDEX_MAX) -> list:
    """``"2:8"`` -> [2..8]; ``"2:8:2"`` -> [2, 4, 6, 8]; ``"5,3"`` -> [3, 5]; ``"4"`` -> [4]
    (sorted, without repeats); values in [1, hi], at most GRID_MAX of them."""
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            step = parts[2] if len(parts) == 3 else 1
            if step < 1:
                raise ValueError
            if (parts[1] - parts[0]) // step >= GRID_MAX:  # counted before the list is built
                raise argparse.ArgumentTypeError(f"range {text!r} has more than {GRID_MAX} "
                                                 "values")
            vals = list(range(parts[0], parts[1] + 1, step))
        else:
            vals = [int(p) for p in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad range {text!r}: use A:B, A:B:STEP or A,B,C") from e
    if len(vals) > GRID_MAX:
        raise argparse.ArgumentTypeError(f"range {text!r} has more than {GRID_MAX} values")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"range {text!r} must hold positive ints")
    if max(vals) > hi:
        raise argparse.ArgumentTypeError(f"range {text!r} must hold ints <= {hi}")
    return sorted(set(vals))


def sgd_settings(preset: str, K: int, Nk: int, init: str | None) -> dict:
    if preset == "paper":
        if K == 1:
            cfg = dict(lr=1e-4, batch=128 * Nk, steps=10_000)
        else:
            cfg = dict(lr=2e-5, batch=1024, steps=100_000)
        cfg.update(optimizer="sgd", tol=None, check_every=100, schedule="vp", retraction="qr",
                   init=init or ("random" if K == 1 else "paper"))
    elif preset == "quick":
        cfg = dict(lr=0.2, batch=128, steps=1000, optimizer="sgd", tol=1e-3, check_every=20,
                   schedule="vp", retraction="qr", init=init or ("random" if K == 1 else "paper"))
    else:
        raise ValueError(f"unknown preset {preset!r}")
    return cfg


# K-subspaces: first restart from the spectral initialisation, 9 random restarts, best (18) kept
BASELINE_SETTINGS = {"svd": {}, "kss": {"n_init": 10, "init": "spectral"},
                     "ensc": {"alpha": 1e-3, "l1_ratio": 0.9}}


def expected_settings(method: str, preset: str, K: int, Nk: int, init) -> dict:
    if method.startswith("sgd"):
        return sgd_settings(preset, K, Nk, init)
    return dict(BASELINE_SETTINGS[method])


def run_cell(K: int, method: str, d: int, Nk: int, instances: int, noise: float, preset: str,
             init: str | None, seed: int) -> dict:
    """Solve one grid cell; returns the record written to its JSON file."""
    from ..cluster import EnSC, KSubspaces, PCASubspace
    from ..data import sample_molrg
    from ..metrics import recovery_success, subspace_distance

    if method == "svd" and K != 1:
        raise ValueError("method 'svd' solves K = 1 only (Theorem 1)")
    cell_seed = seed * 1_000_003 + K * 10_007 + d * 101 + Nk
    data = sample_molrg(N_AMBIENT, [d] * K, counts=[Nk] * K, instances=instances,
                        noise_std=noise, seed=cell_seed, dtype=torch.float64)
    t0 = time.perf_counter()
    extra = {}
    if method.startswith("sgd"):
        from ..train import SubspaceTrainer

        cfg = sgd_settings(preset, K, Nk, init)
        import molrg_ext

        engine = "fused" if hasattr(molrg_ext, "train_step") else "autograd"
        tr = SubspaceTrainer(K, d, mode=method.split("-")[1], seed=cell_seed, engine=engine,
                             **cfg)
        tr.fit(data.X.float(), data.bases.float())
        U = tr.U_
        extra = {"settings": {**cfg, "engine": engine}, "steps_run": tr.n_steps_,
                 "final_loss": tr.history_["loss"][-1].tolist()}
    else:
        cfg = BASELINE_SETTINGS[method]
        est = {"svd": lambda: PCASubspace(d),
               "kss": lambda: KSubspaces(K, d, seed=cell_seed, **cfg),
               "ensc": lambda: EnSC(K, d, seed=cell_seed, **cfg)}[method]()
        extra = {"settings": dict(cfg)}
        bases = []
        for p in range(instances):
            # below the threshold EnSC leaves samples without an edge (its warning): the cell's
            # success rate is what is measured, and the count is kept with it
            with ignoring(("EnSC: .* no nonzero self-expressive", UserWarning),
                          ("EnSC: .* without converging", UserWarning)):
                bases.append(est.fit(data.X[p]).bases_)
            if method == "ensc":
                extra.setdefault("isolated_samples", []).append(est.n_isolated_)
                extra.setdefault("unconverged_fits", []).append(est.n_unconverged_)
        U = torch.stack(bases)
    dist = subspace_distance(U, data.bases, [d] * K)
    ok = recovery_success(dist)
    return {"K": K, "method": method, "d": d, "N_k": Nk, "instances": instances, "noise": noise,
            "preset": preset, "seed": seed, "success_rate": ok.double().mean().item(),
            "distances": dist.tolist(), "seconds": time.perf_counter() - t0, **extra}


def cell_path(out: Path, K: int, method: str, d: int, Nk: int) -> Path:
    return out / "cells" / f"K{K}_{method}_d{d}_N{Nk}.json"


def run_grid(out: Path, K: int, method: str, ds: list, Ns: list, instances: int = 20,
             noise: float = 0.0, preset: str = "quick", init: str | None = None, seed: int = 0,
             progress: bool = True) -> dict:
    """Run (or resume) one (K, method) grid; returns {(d, N_k): record}. Cells whose JSON exists
    with the same settings are loaded, not recomputed."""
    from tqdm.auto import tqdm

    (out / "cells").mkdir(parents=True, exist_ok=True)
    results, computed = {}, 0
    cells = [(d, N) for d in ds for N in Ns]
    bar = tqdm(cells, desc=f"K={K} {method}", disable=not progress)
    for d, Nk in bar:
        path = cell_path(out, K, method, d, Nk)
        rec = None
        if path.exists():
            try:
                rec = json.loads(path.read_text())
                if not isinstance(rec, dict):  # valid JSON, but not a cell (written by hand)
                    raise ValueError("not a cell record")
                same = (rec.get("instances"), rec.get("noise"), rec.get("preset"),
                        rec.get("seed")) == (instances, noise, preset, seed)
                have = {k: v for k, v in rec.get("settings", {}).items() if k != "engine"}
                same = same and have == expected_settings(method, preset, K, Nk, init)
                same = same and all(k in rec for k in ("success_rate", "distances", "seconds"))
                rec = rec if same else None
            except (ValueError, OSError, AttributeError):  # JSONDecodeError is a ValueError
                rec = None
        if rec is None:
            rec = run_cell(K, method, d, Nk, instances, noise, preset, init, seed)
            write_json(str(path), rec)  # atomic: an interrupted run never leaves half a cell
            computed += 1
        results[(d, Nk)] = rec
        bar.set_postfix(d=d, N=Nk, rate=f"{rec['success_rate']:.2f}")
    write_table(out, K, method, ds, Ns, results)
    plot_heatmap(out, K, method, ds, Ns, results)
    results["_computed"] = computed
    return results


def write_table(out: Path, K, method, ds, Ns, results):
    with open(out / f"K{K}_{method}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["K", "method", "d", "N_k", "success_rate", "mean_distance", "seconds"])
        for d in ds:
            for N in Ns:
                r = results[(d, N)]
                w.writerow([K, method, d, N, r["success_rate"],
                            sum(r["distances"]) / len(r["distances"]), round(r["seconds"], 3)])


def plot_heatmap(out: Path, K, method, ds, Ns, results):
    import numpy as np

    # one unit cell per integer (d, N_k) from the smallest to the largest measured; the cells a
    # grid with gaps (A:B:STEP, comma lists) did not measure are drawn in a light colour, not
    # stretched over by their neighbours
    d0, d1, n0, n1 = min(ds), max(ds), min(Ns), max(Ns)
    grid = np.full((d1 - d0 + 1, n1 - n0 + 1), np.nan)
    for d in ds:
        for N in Ns:
            grid[d - d0, N - n0] = results[(d, N)]["success_rate"]
    from matplotlib import colormaps

    cmap = colormaps["gray"].with_extremes(bad="#f2dede")  # a copy (set_bad is deprecated)
    fig, ax = subplots(figsize=(5.5, 3.6))
    im = ax.imshow(np.ma.masked_invalid(grid), origin="lower", cmap=cmap, vmin=0, vmax=1,
                   aspect="auto", extent=(n0 - 0.5, n1 + 0.5, d0 - 0.5, d1 + 0.5))
    line = np.linspace(min(n0, d0) - 0.5, max(n1, d1) + 0.5, 10)
    ax.plot(line, line, "r--", lw=1.2, label="$N_k = d$")
    ax.set_xlim(n0 - 0.5, n1 + 0.5)
    ax.set_ylim(d0 - 0.5, d1 + 0.5)
    ax.set_xlabel("$N_k$ (training samples per subspace)")
    ax.set_ylabel("$d$")
    ax.set_title(f"K = {K}, {method}: success rate")
    ax.legend(loc="upper left", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / f"K{K}_{method}.png", dpi=120)


# the panels of Fig. 4 (a)-(d) and Fig. 8 (a)-(b)
ALL_PANELS = [(1, "svd"), (1, "sgd-hard"), (2, "kss"), (2, "sgd-hard"), (3, "kss"),
              (3, "sgd-hard")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--K", type=int, choices=(1, 2, 3), default=1)
    p.add_argument("--method", choices=METHODS, default=None,
                   help="default: svd for K = 1, kss otherwise")
    p.add_argument("--d", type=functools.partial(parse_range, hi=N_AMBIENT),
                   default=parse_range("2:8"), help=f"e.g. 2:8 (at most n = {N_AMBIENT})")
    p.add_argument("--N", type=parse_range, default=parse_range("2:15"), help="N_k, e.g. 2:15")
    p.add_argument("--instances", type=int_at_least(1), default=20)
    p.add_argument("--preset", choices=("quick", "paper"), default="quick")
    p.add_argument("--noise", type=finite_float(0.0), default=0.0,
                   help="std of the isotropic noise e")
    p.add_argument("--init", choices=("paper", "random"), default=None,
                   help="SGD initialisation (default: random for K = 1, paper (48) for K >= 2)")
    p.add_argument("--out", type=out_dir(Path), default=Path("runs/phase_transition"))
    p.add_argument("--total", action="store_true",
                   help="x axis is the total N = K N_k (the grid --N still gives N_k)")
    p.add_argument("--all", action="store_true", help="all panels of Fig. 4 (a-d) and Fig. 8")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--threads", type=threads_int, default=1,
                   help="torch intra-op threads, at most 4096 (1 is fastest for these small "
                   "problems)")


def run(args) -> int:
    if args.instances < 1:
        raise ValueError("phase-transition: --instances must be >= 1")
    if not 0 <= args.noise < float("inf"):
        raise ValueError("phase-transition: --noise must be finite and >= 0")
    torch.set_num_threads(args.threads)
    panels = ALL_PANELS if args.all else [(args.K, args.method or ("svd" if args.K == 1 else "kss"))]
    summary = {}
    for K, method in panels:
        if method == "svd" and K != 1:
            raise ValueError("phase-transition: --method svd needs --K 1")
        t0 = time.perf_counter()
        res = run_grid(args.out, K, method, args.d, args.N, args.instances, args.noise,
                       args.preset, args.init, args.seed)
        computed = res.pop("_computed")
        if args.total:
            _plot_total(args.out, K, method, args.d, args.N, res)
        summary[f"K{K}_{method}"] = {"computed_cells": computed, "cells": len(res),
                                     "seconds": time.perf_counter() - t0}
        print(f"K={K} {method}: {computed} cells computed in {summary[f'K{K}_{method}']['seconds']:.1f}s")
        print(format_table(args.d, args.N, res))
    # computed_cells and seconds are this invocation's (a resumed run computes only the rest)
    write_json(str(args.out / "summary.json"), summary)
    return 0


def _plot_total(out, K, method, ds, Ns, results):
    """The same heat map with the total sample count N = K N_k on the x axis."""
    import numpy as np

    grid = np.array([[results[(d, N)]["success_rate"] for N in Ns] for d in ds])
    fig, ax = subplots(figsize=(5.5, 3.6))
    im = ax.imshow(grid, origin="lower", cmap="gray", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(Ns)), [str(K * N) for N in Ns], fontsize=7)
    ax.set_yticks(range(len(ds)), [str(d) for d in ds])
    ax.set_xlabel("total N = K N_k")
    ax.set_ylabel("d")
    ax.set_title(f"K = {K}, {method}: success rate")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / f"K{K}_{method}_total.png", dpi=120)


def format_table(ds, Ns, results) -> str:
    head = "d\\N_k " + " ".join(f"{N:>4d}" for N in Ns)
    rows = [f"{d:>6d} " + " ".join(f"{results[(d, N)]['success_rate']:4.2f}" for N in Ns)
            for d in ds]
    return "\n".join([head] + rows[::-1])
