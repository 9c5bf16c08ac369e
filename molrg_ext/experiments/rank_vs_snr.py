"""``molrg rank-vs-snr``: Fig. 3(b) / 7(a) (and a Fig. 3(a) analogue on offline real data).

Numerical rank (eq. (46), eta = 0.99) of the denoiser Jacobian over the ambient dimension, along
the 18-step EDM Heun trajectories of ``noises`` initial noises, against SNR = 1 / sigma:

* MoLRG (K = 2, n = 48, d = 6, N = 1000): the subspace DAE (9) with the true bases (Lemma 2 says
  6 <= rank <= 12) and a network denoiser (a small U-Net on the samples reshaped 3 x 4 x 4, or an
  MLP), evaluated at several training checkpoints (kimg, eq. (47)); the network's gradient-norm
  history is Fig. 7(b).
* real data shipped offline: scikit-learn digits (8 x 8) and 8 x 8 patches of scikit-image's
  ``camera`` image, each with its own network.

Presets: ``quick`` (CI-sized U-Net, EDM preconditioning), ``medium`` (MLP with direct x0
prediction, ``precond="x0"``, uniform loss weight, up to 16000 steps = 1024 kimg: a few minutes on
one CPU thread; its rank ratio follows the subspace DAE's), ``paper`` (U-Net, 500-6000 kimg). With
EDM's preconditioning a briefly trained small net keeps ``D ~ c_skip x`` at high SNR, so its rank
ratio stays near 1 there (see :mod:`molrg_ext.models`).

Differences from the paper's Appendix D: the subspace DAE uses the true bases U* where the paper
trains (9) (with N = 1000 samples its trained bases are close to U*, and Lemma 2's bounds hold
for any bases); all 18 Heun steps are reported where the paper shows 12 of them; Fig. 7(b)'s
gradient norm is the per-step mini-batch norm, not the gradient of the full objective.

Writes ``rank_vs_snr.json``, ``rank_vs_snr.csv`` and ``rank_vs_snr.png`` in ``--out``; trained
models are checkpointed under ``--out/ckpt`` and finished evaluations are reused on a rerun with
the same settings (more ``--checkpoints`` or another ``--real-steps`` add to them; the CSV and the
figure show the ones asked for). Other settings in the same ``--out`` are refused (``--fresh``
starts over).
"""
from __future__ import annotations

import csv
import os
import time

import numpy as np
import torch

from ..data import sample_molrg
from ..jacobian import jacobian_rank
from ..models import make_mlp_denoiser, make_unet_denoiser
from ..modules import SubspaceDAE
from ..sampling import heun_sample
from ..train.network import NetworkTrainer
from ._common import (check_settings, int_at_least, out_dir, read_json, seed_everything,
                      seed_int, seeded_init, subplots, threads_int, width_int, write_json)

PRESETS = {
    # checkpoints: training steps at which the network is evaluated
    "quick": dict(N=1000, noises=15, batch=64, lr=1e-3, checkpoints=[100, 400], channels=16,
                  real_steps=300, real_N=1000, model="unet", precond="edm", weighting="edm"),
    # MLP width 4 * channels = 256, depth 3; checkpoints 64, 256, 1024 kimg
    "medium": dict(N=1000, noises=15, batch=64, lr=1e-3, checkpoints=[1000, 4000, 16000],
                   channels=64, real_steps=8000, real_N=1797, model="mlp", precond="x0",
                   weighting="none"),
    "paper": dict(N=1000, noises=15, batch=64, lr=1e-3, checkpoints=[7800, 15600, 31200, 93700],
                  channels=64, real_steps=20000, real_N=1797, model="unet", precond="edm",
                  weighting="edm"),
}


def add_arguments(p) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", type=out_dir(), default="results/rank_vs_snr")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--checkpoints", type=int_at_least(1), nargs="+",
                   help="training steps to evaluate at")
    p.add_argument("--noises", type=int_at_least(1),
                   help="initial noises per trajectory set (paper: 15)")
    p.add_argument("--real-steps", type=int_at_least(0),
                   help="training steps of the real-data networks (0: skip)")
    p.add_argument("--channels", type=width_int,
                   help="U-Net base channels / MLP width / 4 (at most 2**20)")
    p.add_argument("--model", choices=["unet", "mlp"], help="network (default: the preset's)")
    p.add_argument("--precond", choices=["edm", "x0"], help="EDMDenoiser preconditioning")
    p.add_argument("--weighting", choices=["edm", "none"], help="loss weight lambda(sigma)")
    p.add_argument("--threads", type=threads_int, default=1,
                   help="torch intra-op threads, at most 4096 (small nets: 1)")
    p.add_argument("--fresh", action="store_true",
                   help="delete --out's earlier results and checkpoints first")
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


def model_name(cfg: dict, dataset: str) -> str:
    """Result key prefix: ``unet_molrg`` for the EDM-preconditioned U-Net, else e.g.
    ``mlp_x0_molrg`` (so checkpoints of different models never share a file)."""
    pre = cfg["model"] if cfg["precond"] == "edm" else f"{cfg['model']}_{cfg['precond']}"
    return f"{pre}_{dataset}"


def _train_and_eval(name, data, image_shape, cfg, checkpoints, out, results, progress, seed):
    """Train the network on ``data``; evaluate the rank curve (EMA weights) at each checkpoint."""
    ckpt = os.path.join(out, "ckpt", f"{name}.pt")
    sd = float(data.std())
    if cfg["model"] != "unet":
        data = data.reshape(data.shape[0], -1)

    def trainer(resume: bool) -> NetworkTrainer:
        with seeded_init(seed):
            if cfg["model"] == "unet":
                model = make_unet_denoiser(image_shape, model_channels=cfg["channels"],
                                           sigma_data=sd, precond=cfg["precond"])
            else:
                model = make_mlp_denoiser(data.shape[1], hidden=4 * cfg["channels"], depth=3,
                                          sigma_data=sd, precond=cfg["precond"])
        t = NetworkTrainer(model, data, batch_size=cfg["batch"], lr=cfg["lr"], ema_decay=0.99,
                           seed=seed, checkpoint=ckpt if resume else None,
                           weighting=cfg["weighting"])
        t.checkpoint = ckpt
        return t

    tr = trainer(resume=True)
    n = data[0].numel()
    noise = torch.randn(cfg["noises"], n, generator=torch.Generator().manual_seed(seed + 1))
    for step in sorted(checkpoints):
        key = f"{name}@{step}"
        if key in results:
            continue
        t0 = time.time()
        if tr.step > step:  # the saved network is past this checkpoint: train it again up to it
            tr = trainer(resume=False)
        if tr.step < step:
            tr.train(step - tr.step, progress=progress, save_every=max(1, step // 4))
        tr.ema.eval()
        curve = rank_curve(tr.ema, noise, "jacrev")
        curve.update(step=step, kimg=step * cfg["batch"] / 1000,
                     final_loss=float(np.mean(tr.history["loss"][-20:])),
                     seconds=time.time() - t0)  # training since the previous checkpoint + this evaluation
        results[key] = curve
        gn = tr.history["grad_norm"][:step]  # a retrained prefix does not cut a longer history
        if len(gn) >= len(results.get(f"{name}:grad_norm", [])):
            results[f"{name}:grad_norm"] = gn
        yield key


def run(args) -> int:
    from tqdm.auto import tqdm

    cfg = dict(PRESETS[args.preset])
    for k in ("noises", "channels", "model", "precond", "weighting"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.real_steps is not None:
        cfg["real_steps"] = args.real_steps
    checkpoints = args.checkpoints or cfg["checkpoints"]
    if min(checkpoints) < 1 or cfg["noises"] < 1 or cfg["real_steps"] < 0:
        raise ValueError("rank-vs-snr: need --checkpoints >= 1, --noises >= 1, --real-steps >= 0")
    # what determines the cached curves and networks (not which checkpoints are evaluated)
    settings = _settings_of({**cfg, "seed": args.seed})
    path = os.path.join(args.out, "rank_vs_snr.json")
    fresh = getattr(args, "fresh", False)
    # a folder of an older version has no settings file: its results' config stands in, and
    # networks without a readable config (results moved aside as corrupt) are refused every time
    old = None
    if not fresh and os.path.exists(path):
        old = _settings_of((read_json(path) or {}).get("config", {}))
    if not fresh and old is None and os.path.isdir(os.path.join(args.out, "ckpt")):
        old = {}
    check_settings(args.out, "rank-vs-snr", settings, fresh=fresh,
                   owned=("ckpt", "rank_vs_snr.json", "rank_vs_snr.csv", "rank_vs_snr.png"),
                   saved=old)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    progress = not args.no_progress
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
    for _ in _train_and_eval(model_name(cfg, "molrg"), X, (3, 4, 4), cfg, checkpoints, args.out,
                             results, progress, args.seed):
        write_json(path, results)
        jobs.update(1)
    if cfg["real_steps"]:
        from ..datasets_offline import camera_patches, digits_images
        for name, data in ((model_name(cfg, "digits"), digits_images()),
                           (model_name(cfg, "patches"), camera_patches(cfg["real_N"], seed=args.seed))):
            for _ in _train_and_eval(name, data[: cfg["real_N"]], tuple(data.shape[1:]), cfg,
                                     [cfg["real_steps"]], args.out, results, progress, args.seed):
                write_json(path, results)
            jobs.update(1)
    jobs.close()
    # the figure, the CSV and the summaries show what this run asked for; the JSON keeps all
    wanted = {"subspace_dae"} | {f"{model_name(cfg, 'molrg')}@{s}" for s in checkpoints}
    if cfg["real_steps"]:
        wanted |= {f"{model_name(cfg, d)}@{cfg['real_steps']}" for d in ("digits", "patches")}
    shown = {k: v for k, v in results.items() if k in wanted or k not in _curves(results)}
    # gradient-norm histories of the networks shown, up to the last step asked for
    last = {model_name(cfg, "molrg"): max(checkpoints)}
    if cfg["real_steps"]:
        last |= {model_name(cfg, d): cfg["real_steps"] for d in ("digits", "patches")}
    for k in [k for k in shown if k.endswith(":grad_norm")]:
        name = k[: -len(":grad_norm")]
        if name in last:
            shown[k] = shown[k][: last[name]]
        else:
            del shown[k]
    results["seconds_all_networks"] = sum(v.get("seconds", 0.0) for v in _curves(shown).values())
    results["gap_to_dae"] = {k: dae_gap(v, results["subspace_dae"]) for k, v in shown.items()
                             if "_molrg@" in k}
    shown["gap_to_dae"] = results["gap_to_dae"]
    write_json(path, results)
    _write_csv(os.path.join(args.out, "rank_vs_snr.csv"), shown)
    _plot(os.path.join(args.out, "rank_vs_snr.png"), shown)
    dae = results["subspace_dae"]
    print(f"subspace DAE rank range along trajectories: [{min(dae['rank_mean']):.1f}, "
          f"{max(dae['rank_mean']):.1f}] (Lemma 2: [6, 12])")
    for k, v in shown.items():
        if "@" in k:
            print(f"{k}: kimg {v['kimg']:.1f}, rank/n min {min(v['ratio_mean']):.3f} "
                  f"max {max(v['ratio_mean']):.3f}, loss {v['final_loss']:.4f}")
    for k, g in results["gap_to_dae"].items():
        mid = "n/a" if g["mid"] is None else f"{g['mid']:.3f}"
        print(f"{k}: mean |rank/n - DAE| {g['all']:.3f} (all SNR), {mid} "
              f"(SNR in [0.91, 10]), rank/n at the highest SNR {g['net_high_snr']:.3f} "
              f"(DAE {g['dae_high_snr']:.3f})")
    print(f"wrote {path}")
    return 0


def _settings_of(config: dict) -> dict:
    """The settings part of a run's config (the results file's, for folders written before the
    settings file): all of it but which checkpoints and real-data steps are evaluated."""
    return {k: v for k, v in config.items() if k not in ("checkpoints", "real_steps", "preset")}


def dae_gap(net: dict, dae: dict, mid=(0.91, 10.0)) -> dict:
    """Mean absolute difference of the rank ratios of a network and the subspace DAE along the
    same trajectory grid: over all levels, over the paper's middle SNR range ``mid``, and the two
    ratios at the highest SNR (smallest sigma)."""
    a, b = np.asarray(net["ratio_mean"]), np.asarray(dae["ratio_mean"])
    snr = np.asarray(dae["snr"])
    m = (snr >= mid[0]) & (snr <= mid[1])
    return {"all": float(np.abs(a - b).mean()), "mid": float(np.abs(a - b)[m].mean()) if m.any() else None,
            "net_high_snr": float(a[-1]), "dae_high_snr": float(b[-1])}


def _curves(results):
    """The rank curves, ordered by model and step (not by when a rerun computed them)."""
    def order(k):
        name, _, step = k.partition("@")
        return name, int(step) if step else -1
    return {k: results[k] for k in sorted(results, key=order)
            if isinstance(results[k], dict) and "ratio_mean" in results[k]}


def _write_csv(path, results) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "step", "sigma", "snr", "rank_mean", "rank_std", "rank_ratio"])
        for k, v in _curves(results).items():
            for s, snr, rm, rs, rr in zip(v["sigma"], v["snr"], v["rank_mean"], v["rank_std"], v["ratio_mean"]):
                w.writerow([k, v.get("step", ""), s, snr, rm, rs, rr])


def _plot(path, results) -> None:
    fig, axes = subplots(1, 3, figsize=(15, 4))
    curves = _curves(results)
    for k, v in curves.items():
        if k == "subspace_dae" or "_molrg@" in k:
            label = k if k == "subspace_dae" else f"{k.split('_molrg')[0]}, {v['kimg']:.0f} kimg"
            axes[0].plot(v["snr"], v["ratio_mean"], marker="o", ms=3, label=label)
        else:
            axes[1].plot(v["snr"], v["ratio_mean"], marker="o", ms=3, label=k.split("@")[0])
    cfg = results.get("config", {})
    net = f"{cfg.get('model', 'unet')}, {cfg.get('precond', 'edm')} precond"
    for ax, title in ((axes[0], f"MoLRG K=2, n=48, d=6 (Fig. 3b / 7a); {net}"),
                      (axes[1], f"offline real data (Fig. 3a); {net}")):
        ax.set_xscale("log")
        ax.set_xlabel("SNR 1/sigma")
        ax.set_ylabel("rank(J) / n")
        ax.set_ylim(0, 1.05 * max([1e-3] + [line.get_ydata().max() for line in ax.get_lines()]))
        ax.set_title(title, fontsize=10)
        if ax.get_lines():
            ax.legend(fontsize=7)
    for k, v in results.items():
        if k.endswith(":grad_norm") and v:
            axes[2].plot(np.arange(1, len(v) + 1), v, lw=0.7, label=k.split(":")[0])
    axes[2].set_yscale("log")
    axes[2].set_xlabel("training step")
    axes[2].set_ylabel("gradient norm (Fig. 7b)")
    if axes[2].get_lines():
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
