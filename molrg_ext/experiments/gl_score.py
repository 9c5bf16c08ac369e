"""``molrg gl-score``: Fig. 5(a), GL score (21) of a trained network denoiser against N_k / d_k.

For each d_k and ratio N_k / d_k: draw a MoLRG training set (K = 2, n = 48, N_k = max(1,
round(ratio d_k)) samples per component; the figure and the crossing use the realised
N_k / d_k), train a small U-Net (samples reshaped 3 x 4 x 4) or MLP, generate
``gen`` samples with the 18-step Heun sampler and score them against as many fresh MoLRG samples.
The paper sees GL ~ 1 from about N_k = 60 d_k (U-Net, lr 1e-3, batch 64, 1e4 steps).

Presets: ``quick`` (CI-sized, EDM-preconditioned U-Net, curve only indicative), ``medium`` (an MLP
with direct x0 prediction, ``precond="x0"``, uniform loss weight, 3000 steps per cell: about
10 min on one CPU thread; it shows the memorisation -> generalisation transition), ``paper``.
With EDM's preconditioning a small net trained briefly does not remove the off-subspace noise at
small sigma and the GL score exceeds 1 at every ratio (see :mod:`molrg_ext.models`).

Writes ``gl_score.json`` / ``.csv`` / ``.png`` to ``--out``; finished cells are kept on a rerun
(each under a key of all the settings that determine it: seed, model, training and sampling), and
the CSV and figure show the cells of the current grid.
"""
from __future__ import annotations

import csv
import os
import time

import numpy as np
import torch

from ..data import sample_molrg
from ..metrics.generation import gl_score
from ..models import make_mlp_denoiser, make_unet_denoiser
from ..sampling import heun_sample
from ..train.network import NetworkTrainer
from ._common import (INDEX_MAX, finite_float, int_at_least, out_dir, read_json,
                      seed_everything, seed_int, seeded_init, subplots, threads_int, width_int,
                      write_json)

PRESETS = {
    "quick": dict(dims=[3, 4, 5, 6], ratios=[2, 10, 40], steps=300, batch=64, lr=1e-3, gen=300,
                  channels=16, model="unet", precond="edm", weighting="edm"),
    # MLP width 4 * channels = 256, depth 3; ~20 s per cell on one thread
    "medium": dict(dims=[3, 4, 5, 6], ratios=[1, 2, 5, 10, 20, 40, 80], steps=3000, batch=64,
                   lr=1e-3, gen=600, channels=64, model="mlp", precond="x0", weighting="none"),
    "paper": dict(dims=[3, 4, 5, 6], ratios=[5, 10, 20, 40, 60, 80, 120], steps=10000, batch=64,
                  lr=1e-3, gen=2000, channels=64, model="unet", precond="edm", weighting="edm"),
}


def add_arguments(p) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", type=out_dir(), default="results/gl_score")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--dims", type=int_at_least(1), nargs="+", help="d_k values (paper: 3 4 5 6)")
    p.add_argument("--ratios", type=finite_float(0.0, lo_open=True), nargs="+",
                   help="N_k / d_k values (N_k = max(1, round(ratio d_k)), at most 2**31 - 1; "
                        "ratios giving the same N_k are computed once, and the figure's x axis "
                        "is the realised N_k / d_k)")
    p.add_argument("--steps", type=int_at_least(1), help="training steps per cell")
    p.add_argument("--gen", type=int_at_least(2), help="generated (and reference) samples per cell")
    p.add_argument("--model", choices=["unet", "mlp"], help="network (default: the preset's)")
    p.add_argument("--precond", choices=["edm", "x0"], help="EDMDenoiser preconditioning")
    p.add_argument("--weighting", choices=["edm", "none"], help="loss weight lambda(sigma)")
    p.add_argument("--channels", type=width_int,
                   help="U-Net base channels / MLP width / 4 (at most 2**20)")
    p.add_argument("--threads", type=threads_int, default=1,
                   help="torch intra-op threads, at most 4096 (small nets: 1)")
    p.add_argument("--no-progress", action="store_true")


def n_per_component(ratio: float, d: int) -> int:
    """N_k for a requested N_k / d_k: ``max(1, round(ratio d))``."""
    return max(1, int(round(ratio * d)))


def run_cell(d: int, ratio: float, cfg: dict, model_kind: str, seed: int, progress: bool = False) -> dict:
    """Train on 2 x N_k MoLRG samples (N_k = round(ratio d)) and return the GL score and losses.
    ``cfg`` holds steps, batch, lr, gen, channels and optionally precond / weighting."""
    Nk = n_per_component(ratio, d)
    data = sample_molrg(48, [d, d], counts=[Nk, Nk], seed=seed)
    X = data.X[0]
    sd = float(X.std())
    precond = cfg.get("precond", "edm")
    with seeded_init(seed):
        if model_kind == "unet":
            model = make_unet_denoiser((3, 4, 4), model_channels=cfg["channels"], sigma_data=sd,
                                       precond=precond)
        else:
            model = make_mlp_denoiser(48, hidden=4 * cfg["channels"], depth=3, sigma_data=sd,
                                      precond=precond)
    tr = NetworkTrainer(model, X, batch_size=cfg["batch"], lr=cfg["lr"], ema_decay=0.99, seed=seed,
                        weighting=cfg.get("weighting", "edm"))
    tr.train(cfg["steps"], progress=progress)
    noise = torch.randn(cfg["gen"], 48, generator=torch.Generator().manual_seed(seed + 7))
    tr.ema.eval()
    gen = heun_sample(tr.ema, noise)
    ref = data.sample(cfg["gen"], seed=seed + 11)[0][0]
    score = gl_score(gen, ref)
    # how close the samples are to the training set (memorisation diagnostic)
    from ..metrics.generation import nearest_neighbor_distances
    nn_train = float(nearest_neighbor_distances(gen, X).median())
    nn_ref = float(nearest_neighbor_distances(ref, X).median())
    # distance of the samples from the union of the true subspaces (how far off the data they are)
    B = data.bases[0].to(gen.dtype)
    off = torch.stack([(gen - gen @ B[k] @ B[k].T).norm(dim=1) for k in range(B.shape[0])]).min(0).values
    return {"d": d, "ratio": ratio, "N_k": Nk, "gl": score, "median_nn_to_train_gen": nn_train,
            "median_nn_to_train_ref": nn_ref, "median_off_subspace_gen": float(off.median()),
            "final_loss": float(np.mean(tr.history["loss"][-50:])), "kimg": tr.kimg}


def crossing(ratios, scores, level: float = 0.5) -> dict:
    """Where the (piecewise-linear in log N_k / d_k) GL curve first reaches ``level``.

    Returns ``{"ratio": r, "status": "crossed"}`` when it crosses inside the measured range;
    ``{"ratio": None, "status": "at_or_below_smallest", "smallest_ratio": r0}`` when GL is already
    >= level at the smallest ratio measured (the crossing is not located); and
    ``{"ratio": None, "status": "never"}`` when it stays below ``level``.
    """
    r, s = np.asarray(ratios, float), np.asarray(scores, float)
    order = np.argsort(r)
    r, s = r[order], s[order]
    if s[0] >= level:
        return {"ratio": None, "status": "at_or_below_smallest", "smallest_ratio": float(r[0])}
    for i in range(1, len(r)):
        if s[i] >= level:
            t = (level - s[i - 1]) / (s[i] - s[i - 1])
            x = np.exp(np.log(r[i - 1]) + t * (np.log(r[i]) - np.log(r[i - 1])))
            return {"ratio": float(x), "status": "crossed"}
    return {"ratio": None, "status": "never"}


def run(args) -> int:
    from tqdm.auto import tqdm

    cfg = dict(PRESETS[args.preset])
    for k in ("dims", "ratios", "steps", "gen", "channels", "model", "precond", "weighting"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if min(cfg["dims"]) < 1 or 2 * max(cfg["dims"]) > 48:
        raise ValueError("gl-score: --dims must be in [1, 24] (K = 2, n = 48)")
    if not all(0 < r < float("inf") for r in cfg["ratios"]) or cfg["gen"] < 2 or cfg["steps"] < 1:
        raise ValueError("gl-score: --ratios must be finite and > 0, --gen >= 2, --steps >= 1")
    if max(cfg["ratios"]) * max(cfg["dims"]) > INDEX_MAX:  # N_k, a count of samples
        raise ValueError(f"gl-score: --ratios times --dims (N_k) must be <= {INDEX_MAX}, got "
                         f"{max(cfg['ratios']):g} * {max(cfg['dims'])}")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    path = os.path.join(args.out, "gl_score.json")
    saved = read_json(path) or {}
    cells = saved.get("cells", {})
    model = cfg["model"]
    config = {**cfg, "seed": args.seed, "preset": args.preset}

    def key(d, r):  # every setting that changes a cell's result
        return (f"d{d}_r{r:g}_{model}_{cfg['precond']}_{cfg['weighting']}_s{cfg['steps']}"
                f"_c{cfg['channels']}_g{cfg['gen']}_b{cfg['batch']}_lr{cfg['lr']:g}"
                f"_seed{args.seed}")

    # one cell per (d_k, N_k): ratios that round to the same N_k would train the same cell and
    # be plotted apart; the x axis is the realised N_k / d_k
    todo, seen = [], {}
    for d in cfg["dims"]:
        for r in cfg["ratios"]:
            nk = n_per_component(r, d)
            if (d, nk) in seen:
                print(f"gl-score: d_k = {d}: N_k/d_k = {r:g} gives N_k = {nk}, as "
                      f"{seen[(d, nk)]:g} does; computed once")
                continue
            seen[(d, nk)] = r
            todo.append((d, r))
    t_start = time.time()
    for d, r in tqdm(todo, desc="gl-score", disable=args.no_progress):
        if key(d, r) in cells:
            continue
        t0 = time.time()
        cells[key(d, r)] = run_cell(d, r, cfg, model, args.seed + 1000 * d, progress=False)
        cells[key(d, r)]["seconds"] = time.time() - t0
        write_json(path, {"config": config, "cells": cells})
    rows = [dict(cells[key(d, r)], N_k_over_d_k=cells[key(d, r)]["N_k"] / d) for d, r in todo]
    summary = {}
    for d in cfg["dims"]:
        rs = sorted((row for row in rows if row["d"] == d), key=lambda x: x["N_k"])
        summary[str(d)] = crossing([x["N_k_over_d_k"] for x in rs], [x["gl"] for x in rs])
    write_json(path, {"config": config, "cells": cells, "crossing_0.5": summary,
                      "seconds_this_run": time.time() - t_start,
                      "seconds_all_cells": sum(row.get("seconds", 0.0) for row in rows)})
    with open(os.path.join(args.out, "gl_score.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fig, ax = subplots(figsize=(5.5, 4))
    for d in cfg["dims"]:
        rs = sorted((row for row in rows if row["d"] == d), key=lambda x: x["N_k"])
        ax.plot([x["N_k_over_d_k"] for x in rs], [x["gl"] for x in rs], marker="o",
                label=f"d_k = {d}")
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.axvline(60, color="grey", lw=0.5, ls=":", label="paper: GL ~ 1 at N_k = 60 d_k")
    ax.set_xscale("log")
    ax.set_xlabel("N_k / d_k")
    ax.set_ylabel("GL score")
    ax.set_title(f"Fig. 5(a): {model} ({cfg['precond']} precond), {cfg['steps']} steps "
                 f"({args.preset})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "gl_score.png"), dpi=120)
    for row in rows:
        asked = "" if row["N_k"] == row["ratio"] * row["d"] else f" (asked {row['ratio']:g})"
        print(f"d_k={row['d']} N_k={row['N_k']} N_k/d_k={row['N_k_over_d_k']:.4g}{asked}: "
              f"GL {row['gl']:.3f}")
    print("N_k/d_k where GL reaches 0.5:", summary)
    return 0
