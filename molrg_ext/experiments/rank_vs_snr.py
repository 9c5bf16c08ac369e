"""``molrg rank-vs-snr``: Fig. 3(b) / 7(a) (and a Fig. 3(a) analogue on offline real data).

Numerical rank (eq. (46), eta = 0.99) of the denoiser Jacobian over the ambient dimension, along
the 18-step EDM Heun trajectories of ``noises`` initial noises, against SNR = 1 / sigma:

* MoLRG (K = 2, n = 48, d = 6, N = 1000): the subspace DAE (9) with the true bases (Lemma 2 says
  6 <= rank <= 12) and a small U-Net on the samples reshaped 3 x 4 x 4, evaluated at several
  training checkpoints (kimg, eq. (47)); the U-Net's gradient-norm history is Fig. 7(b).
* real data shipped offline: scikit-learn digits (8 x 8) and 8 x 8 patches of scikit-image's
  ``camera`` image, each with its own small U-Net.

Writes ``rank_vs_snr.json``, ``rank_vs_snr.csv`` and ``rank_vs_snr.png`` in ``--out``; trained
models are checkpointed under ``--out/ckpt`` and finished evaluations are reused on a rerun.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import torch

from ..data import sample_molrg
from ..jacobian import jacobian_rank
from ..models import make_unet_denoiser
from ..modules import SubspaceDAE
from ..sampling import default_sigma_steps, heun_sample
from ..train.network import NetworkTrainer
from ._common import read_json, seed_everything, write_json

PRESETS = {
    # checkpoints: training steps at which the network is evaluated
    "quick": dict(N=1000, noises=15, batch=64, lr=1e-3, checkpoints=[100, 400], channels=16,
                  real_steps=300, real_N=1000),
    "paper": dict(N=1000, noises=15, batch=64, lr=1e-3, checkpoints=[7800, 15600, 31200, 93700],
                  channels=64, real_steps=20000, real_N=1797),
}


def add_arguments(p) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", default="results/rank_vs_snr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoints", type=int, nargs="+", help="training steps to evaluate at")
    p.add_argument("--noises", type=int, help="initial noises per trajectory set (paper: 15)")
    p.add_argument("--real-steps", type=int, help="training steps of the real-data U-Nets (0: skip)")
    p.add_argument("--channels", type=int, help="U-Net base channels")
    p.add_argument("--no-progress", action="store_true")


def rank_curve(denoiser, noise: torch.Tensor, method: str = "auto") -> dict:
    """Heun trajectory from ``noise``; rank ratio (rank / n) at each non-final step."""
    n = noise[0].numel()
    tr = heun_sample(denoiser, noise, return_trajectory=True)
    ranks = []
    for i in range(tr.sigma.numel() - 1):
        r = jacobian_rank(denoiser, tr.x[i], float(tr.sigma[i]), method=method)
        ranks.append(r.double().cpu().numpy())
    R = np.stack(ranks)  # [steps, noises]
    return {"sigma": tr.sigma[:-1].tolist(), "snr": (1 / tr.sigma[:-1]).tolist(),
            "rank_mean": R.mean(1).tolist(), "rank_std": R.std(1).tolist(),
            "ratio_mean": (R.mean(1) / n).tolist(), "n": n}


def _train_and_eval(name, data, image_shape, cfg, checkpoints, out, results, progress, seed):
    """Train a U-Net on ``data``; evaluate the rank curve (EMA weights) at each checkpoint."""
    ckpt = os.path.join(out, "ckpt", f"{name}.pt")
    torch.manual_seed(seed)
    model = make_unet_denoiser(image_shape, model_channels=cfg["channels"], sigma_data=float(data.std()))
    tr = NetworkTrainer(model, data, batch_size=cfg["batch"], lr=cfg["lr"], ema_decay=0.99,
                        seed=seed, checkpoint=ckpt)
    n = data[0].numel()
    noise = torch.randn(cfg["noises"], n, generator=torch.Generator().manual_seed(seed + 1))
    for step in sorted(checkpoints):
        key = f"{name}@{step}"
        if key in results:
            continue
        if tr.step < step:
            tr.train(step - tr.step, progress=progress, save_every=max(1, step // 4))
        tr.ema.eval()
        curve = rank_curve(tr.ema, noise, "jacrev")
        curve.update(step=step, kimg=step * cfg["batch"] / 1000, final_loss=float(np.mean(tr.history["loss"][-20:])))
        results[key] = curve
        results[f"{name}:grad_norm"] = tr.history["grad_norm"][:step]
        yield key


def run(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    cfg = dict(PRESETS[args.preset])
    for k in ("noises", "channels"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.real_steps is not None:
        cfg["real_steps"] = args.real_steps
    checkpoints = args.checkpoints or cfg["checkpoints"]
    if min(checkpoints) < 1:
        raise SystemExit("rank-vs-snr: --checkpoints must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    seed_everything(args.seed)
    progress = not args.no_progress
    path = os.path.join(args.out, "rank_vs_snr.json")
    results = read_json(path) or {}
    results["config"] = {**cfg, "checkpoints": checkpoints, "seed": args.seed, "preset": args.preset}

    molrg = sample_molrg(48, [6, 6], N=cfg["N"], seed=args.seed)
    X = molrg.X[0]
    noise = torch.randn(cfg["noises"], 48, generator=torch.Generator().manual_seed(args.seed + 1))
    jobs = tqdm(total=1 + len(checkpoints) + (2 if cfg["real_steps"] else 0), desc="rank-vs-snr",
                disable=not progress)
    if "subspace_dae" not in results:
        dae = SubspaceDAE(48, molrg.dims, U=molrg.bases[0].double(), dtype=torch.float64)
        results["subspace_dae"] = rank_curve(dae, noise.double(), "analytic")
        write_json(path, results)
    jobs.update(1)
    for _ in _train_and_eval("unet_molrg", X, (3, 4, 4), cfg, checkpoints, args.out, results,
                             progress, args.seed):
        write_json(path, results)
        jobs.update(1)
    if cfg["real_steps"]:
        from ..datasets_offline import camera_patches, digits_images
        for name, data in (("unet_digits", digits_images()), ("unet_patches", camera_patches(cfg["real_N"], seed=args.seed))):
            for _ in _train_and_eval(name, data[: cfg["real_N"]], tuple(data.shape[1:]), cfg,
                                     [cfg["real_steps"]], args.out, results, progress, args.seed):
                write_json(path, results)
            jobs.update(1)
    jobs.close()
    write_json(path, results)
    _write_csv(os.path.join(args.out, "rank_vs_snr.csv"), results)
    _plot(plt, os.path.join(args.out, "rank_vs_snr.png"), results)
    dae = results["subspace_dae"]
    print(f"subspace DAE rank range along trajectories: [{min(dae['rank_mean']):.1f}, "
          f"{max(dae['rank_mean']):.1f}] (Lemma 2: [6, 12])")
    for k, v in results.items():
        if "@" in k:
            print(f"{k}: kimg {v['kimg']:.1f}, rank/n min {min(v['ratio_mean']):.3f} "
                  f"max {max(v['ratio_mean']):.3f}, loss {v['final_loss']:.4f}")
    print(f"wrote {path}")
    return 0


def _curves(results):
    return {k: v for k, v in results.items() if isinstance(v, dict) and "ratio_mean" in v}


def _write_csv(path, results) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "step", "sigma", "snr", "rank_mean", "rank_std", "rank_ratio"])
        for k, v in _curves(results).items():
            for s, snr, rm, rs, rr in zip(v["sigma"], v["snr"], v["rank_mean"], v["rank_std"], v["ratio_mean"]):
                w.writerow([k, v.get("step", ""), s, snr, rm, rs, rr])


def _plot(plt, path, results) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    curves = _curves(results)
    for k, v in curves.items():
        if k == "subspace_dae" or k.startswith("unet_molrg"):
            label = k if k == "subspace_dae" else f"U-Net, {v['kimg']:.1f} kimg"
            axes[0].plot(v["snr"], v["ratio_mean"], marker="o", ms=3, label=label)
        else:
            axes[1].plot(v["snr"], v["ratio_mean"], marker="o", ms=3, label=k.split("@")[0])
    for ax, title in ((axes[0], "MoLRG K=2, n=48, d=6 (Fig. 3b / 7a)"), (axes[1], "offline real data (Fig. 3a)")):
        ax.set_xscale("log")
        ax.set_xlabel("SNR 1/sigma")
        ax.set_ylabel("rank(J) / n")
        ax.set_title(title)
        ax.legend(fontsize=7)
    for k, v in results.items():
        if k.endswith(":grad_norm") and v:
            axes[2].plot(np.arange(1, len(v) + 1), v, lw=0.7, label=k.split(":")[0])
    axes[2].set_yscale("log")
    axes[2].set_xlabel("training step")
    axes[2].set_ylabel("gradient norm (Fig. 7b)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
