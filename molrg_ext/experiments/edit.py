"""``molrg edit``: Section 4.2 / Appendix E.4, editing along Jacobian singular vectors.

Train a small EDM U-Net on scikit-learn digits (offline), take a training image ``x_0``, map it to
``x_t`` at noise level ``--sigma`` with the deterministic DDIM inversion (the probability-flow ODE
run forward), move ``x_t + alpha v_i`` along the top right singular vectors ``v_i`` of the
Jacobian of the denoiser at ``x_t`` (and along a random unit direction for comparison), and run
the Heun sampler from there back to sigma = 0. ``alpha`` spans [-6, 6].

Also records how much each edit changes the denoiser output relative to the random direction,
i.e. ``||x_theta(x_t + alpha v) - x_theta(x_t)||`` (first order: ``|alpha| sigma_i``), and
how much it changes the generated sample, ``||sample(alpha) - sample(0)||`` (the unedited
sample, also when ``--alphas`` leaves 0 out).
Writes ``edit.png`` (grid), ``edit.json`` and ``edit.csv`` to ``--out``; the trained model is
checkpointed under ``--out/ckpt_edit`` and resumed or reused by a rerun with the same seed and
training settings (other ones in the same ``--out`` are refused; ``--fresh`` starts over).
"""
from __future__ import annotations

import csv
import os

import numpy as np
import torch

from ..datasets_offline import digits_images
from ..jacobian import jacobian_spectrum
from ..models import make_unet_denoiser
from ..sampling import default_sigma_steps, heun_sample
from ..train.network import NetworkTrainer
from ._common import (FLOAT32_MAX, check_settings, finite_float, int_at_least, out_dir,
                      seed_everything, seed_int, subplots, width_int, write_json)

PRESETS = {
    "quick": dict(steps=800, batch=64, lr=1e-3, channels=16, sigma=1.0, images=2),
    "paper": dict(steps=20000, batch=64, lr=1e-3, channels=64, sigma=1.0, images=4),
}


def add_arguments(p) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", type=out_dir(), default="results/edit")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--steps", type=int_at_least(1), help="training steps of the U-Net")
    p.add_argument("--channels", type=width_int, help="U-Net base channels (at most 2**20)")
    p.add_argument("--sigma", type=finite_float(0.002, lo_open=True, hi=FLOAT32_MAX),
                   help="noise level of the edit (x_t), > 0.002 and finite in float32")
    p.add_argument("--images", type=int_at_least(1), help="number of images to edit")
    p.add_argument("--directions", type=int_at_least(1), nargs="+", default=[1, 2, 3],
                   help="which singular vectors (1-based, at most 64) to move along")
    p.add_argument("--alphas", type=finite_float(), nargs="+", default=[-6, -3, 0, 3, 6])
    p.add_argument("--fresh", action="store_true", help="delete --out's earlier model and results first")
    p.add_argument("--no-progress", action="store_true")


@torch.no_grad()
def invert(denoiser, x0: torch.Tensor, sigma: float, steps: int = 18) -> torch.Tensor:
    """DDIM inversion: Euler steps of the PF-ODE from sigma_min = 0.002 up to ``sigma``."""
    grid = default_sigma_steps(steps, sigma_min=0.002, sigma_max=sigma).flip(0).to(x0.dtype)
    x = x0.clone()
    for i in range(grid.numel() - 1):
        d = denoiser(x, grid[i].expand(x.shape[0]))
        x = d + (grid[i + 1] / grid[i]) * (x - d)
    return x


def run(args) -> int:
    cfg = dict(PRESETS[args.preset])
    for k in ("steps", "channels", "sigma", "images"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    for ok, what in ((cfg["sigma"] > 0.002, "--sigma must be > 0.002"),
                     (cfg["images"] >= 1, "--images must be >= 1"),
                     (cfg["steps"] >= 1, "--steps must be >= 1"),
                     (1 <= min(args.directions) and max(args.directions) <= 64,
                      "--directions must be in [1, 64] (the digits are 8 x 8)")):
        if not ok:
            raise ValueError(f"edit: {what}")
    # the checkpointed network depends on these; the edit itself is recomputed on every run
    # (its own checkpoint folder: rank-vs-snr, which may share --out, has ckpt/unet_digits.pt too)
    check_settings(args.out, "edit", {k: cfg[k] for k in ("steps", "batch", "lr", "channels")}
                   | {"seed": args.seed}, fresh=getattr(args, "fresh", False),
                   owned=("ckpt_edit", "edit.json", "edit.csv", "edit.png"))
    seed_everything(args.seed)
    data = digits_images()
    torch.manual_seed(args.seed)
    model = make_unet_denoiser((1, 8, 8), model_channels=cfg["channels"], sigma_data=float(data.std()))
    tr = NetworkTrainer(model, data, batch_size=cfg["batch"], lr=cfg["lr"], ema_decay=0.99,
                        seed=args.seed,
                        checkpoint=os.path.join(args.out, "ckpt_edit", "unet_digits.pt"))
    if tr.step < cfg["steps"]:
        tr.train(cfg["steps"] - tr.step, progress=not args.no_progress, save_every=200)
    den = tr.ema.eval()
    g = torch.Generator().manual_seed(args.seed + 3)
    idx = torch.randperm(data.shape[0], generator=g)[: cfg["images"]]
    x0 = data[idx]
    sigma = float(cfg["sigma"])
    xt = invert(den, x0, sigma)
    k = max(args.directions)
    sp = jacobian_spectrum(den, xt, sigma, "jacrev", k, vectors=True)
    rand = torch.randn(xt.shape, generator=g)
    rand = rand / rand.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    grid = default_sigma_steps(18, sigma_max=sigma)
    alphas = list(args.alphas)
    rows, panels = [], []  # panels[image][direction] = list of images over alpha
    with torch.no_grad():
        base = den(xt, torch.full((xt.shape[0],), sigma))
        for b in range(xt.shape[0]):
            per_dir = []
            # sample_change is measured from the unedited sample (alpha = 0; it had been measured
            # from x_0 when --alphas left 0 out, under the same column name)
            unedited = None if 0 in alphas else heun_sample(den, xt[b:b + 1] / sigma, grid)[0]
            for name, v in [(f"v{i}", sp.vectors[b, i - 1]) for i in args.directions] + [("random", rand[b])]:
                x_edit = torch.stack([xt[b] + a * v for a in alphas])
                out = heun_sample(den, x_edit / sigma, grid)
                d_out = den(x_edit, torch.full((len(alphas),), sigma))
                change = (d_out - base[b]).flatten(1).norm(dim=1)
                ref = out[alphas.index(0)] if unedited is None else unedited
                for a, c, o in zip(alphas, change.tolist(), out):
                    rows.append({"image": int(idx[b]), "direction": name, "alpha": a,
                                 "denoiser_change": c, "sample_change": float((o - ref).norm())})
                per_dir.append((name, out))
            panels.append(per_dir)
    svals = sp.svals.tolist()
    summary = {}
    for name in [f"v{i}" for i in args.directions] + ["random"]:
        ch = [r["denoiser_change"] for r in rows if r["direction"] == name and abs(r["alpha"]) == max(map(abs, alphas))]
        summary[name] = float(np.mean(ch))
    write_json(os.path.join(args.out, "edit.json"), {
        "config": {**cfg, "seed": args.seed, "preset": args.preset, "alphas": alphas,
                   "directions": args.directions},
        "images": idx.tolist(), "top_singular_values": svals, "rows": rows,
        "mean_denoiser_change_at_max_alpha": summary,
        "train_loss_last50": float(np.mean(tr.history["loss"][-50:])) if tr.history["loss"] else None,
    })
    with open(os.path.join(args.out, "edit.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    nrow = sum(len(p) for p in panels)
    fig, axes = subplots(nrow, len(alphas), squeeze=False,
                         figsize=(1.3 * len(alphas), 1.3 * nrow))
    r = 0
    for b, per_dir in enumerate(panels):
        for name, out in per_dir:
            for j, a in enumerate(alphas):
                ax = axes[r, j]
                ax.imshow(out[j, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"alpha={a:g}", fontsize=7)
                if j == 0:
                    ax.set_ylabel(f"img{b} {name}", fontsize=7)
            r += 1
    fig.suptitle(f"Editing x_t (sigma={sigma:g}) along Jacobian singular vectors", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "edit.png"), dpi=120)
    print("top singular values per image:", [[round(s, 3) for s in row] for row in svals])
    print("mean ||x_theta(x_t + alpha v) - x_theta(x_t)|| at |alpha| = max:", summary)
    return 0
