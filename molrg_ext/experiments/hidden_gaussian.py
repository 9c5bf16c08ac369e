"""``molrg hidden-gaussian``: the memorisation-to-generalisation picture of seed 003.

For each data set (MoLRG samples, scikit-learn digits) and each training-set size N, a small
network denoiser (EDM preconditioning and loss) is trained on N samples. Across the EDM noise grid
we then measure the RMSE between its outputs and those of

* the Gaussian denoiser of the training set (eq. (6)),
* the empirical optimal (multi-delta) denoiser of the training set (eq. (5)),
* the posterior-mean denoiser of the MoLRG (the true data model for MoLRG data; for digits a
  MoLRG fitted to all 1797 images: one uncentred top-d PCA basis per digit class),

on noisy training samples x_0 + sigma eps, and its linearity score (eq. (11)). Small N should
track the multi-delta denoiser (memorisation, low linearity), large N the Gaussian / MoLRG ones.

Outputs in ``--out``: one JSON per (data set, N) under ``runs/`` (finished runs are skipped on
restart), ``hidden_gaussian.json`` (all results) and ``hidden_gaussian.png``.

The network is issue 8's EDM-preconditioned MLP trained with its ``NetworkTrainer``; swap in
another denoiser through :func:`train_denoiser`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from ._common import (int_at_least, int_list, out_dir, read_json, seed_int,
                      seeded_init, subplots, threads_int, width_int, write_json)

PRESETS = {
    "quick": dict(sizes=[16, 128, 1024], steps=2000, hidden=128, batch=128, n_eval=200,
                  n_sigmas=10, n_pairs=100),
    "full": dict(sizes=[8, 32, 128, 512, 1024, 1536], steps=8000, hidden=512, batch=256,
                 n_eval=500, n_sigmas=18, n_pairs=100),
}


# ------------------------------------------------------------------------------------------ data
def molrg_data(N: int, n: int, K: int, d: int, seed: int):
    """N MoLRG samples (K mutually orthogonal d-dim subspaces of R^n, uniform weights) and U*
    [K, n, d], from :func:`molrg_ext.data.sample_molrg`."""
    from ..data import sample_molrg

    data = sample_molrg(n, [d] * K, N=N, instances=1, seed=seed, dtype=torch.float32)
    return data.X[0], data.bases[0]


def digits_data():
    """scikit-learn digits scaled to [-1, 1] (float32 [1797, 64]) and labels."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    X = torch.tensor(ds.data, dtype=torch.float32) / 8.0 - 1.0
    return X, torch.tensor(ds.target)


def fitted_molrg_bases(X: torch.Tensor, labels: torch.Tensor, d: int) -> torch.Tensor:
    """One uncentred top-d PCA basis per class: U [K, n, d]."""
    bases = []
    for c in labels.unique().tolist():
        Xc = X[labels == c].double()
        U, _, _ = torch.linalg.svd(Xc.T, full_matrices=False)
        bases.append(U[:, :d])
    return torch.stack(bases).float()


# --------------------------------------------------------------------------------------- network
class LogUniformSigma:
    """Noise 'schedule' for :class:`~molrg_ext.train.network.NetworkTrainer`:
    ``sigma(t) = smin (smax / smin)^t``, so t ~ U[0, 1] gives log-uniform sigma on the EDM range."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t


def train_denoiser(X: torch.Tensor, steps: int, hidden: int, batch: int, seed: int,
                   progress=None):
    """EDM-preconditioned MLP (issue 8's :func:`~molrg_ext.models.make_mlp_denoiser`) trained with
    :class:`~molrg_ext.train.network.NetworkTrainer` (Adam, lr 1e-3, EDM loss weight), sigma drawn
    log-uniformly on [0.002, 80] so that every level of the evaluation grid is trained (EDM's
    log-normal rarely visits sigma > 10, which seed 003 notes leaves vanilla models under-trained
    there). Returns the EMA model (decay 0.99) in eval mode."""
    from ..models import make_mlp_denoiser
    from ..train.network import NetworkTrainer

    sigma_data = float(X.std())
    with seeded_init(seed):
        model = make_mlp_denoiser(X.shape[1], hidden=hidden, depth=3, sigma_data=sigma_data)
    trainer = NetworkTrainer(model, X, batch_size=batch, lr=1e-3, ema_decay=0.99,
                             noise=LogUniformSigma(), t_min=1e-6, sigma_data=sigma_data,
                             seed=seed)
    trainer.train(steps, callback=(lambda _t: progress.update(1)) if progress is not None
                  else None)
    ema = trainer.ema
    ema.eval()
    return ema


# ---------------------------------------------------------------------------------- evaluation
@dataclass
class RunConfig:
    dataset: str
    N: int
    steps: int
    hidden: int
    batch: int
    n_eval: int
    n_sigmas: int
    n_pairs: int
    seed: int
    molrg_n: int
    molrg_K: int
    molrg_d: int
    digits_d: int

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Seed 003's Score-Difference, eq. (10): the mean over samples of each sample's RMSE
    sqrt(||a_i - b_i||^2 / d) (not the root of the batch's mean square, which Jensen's inequality
    makes larger: up to 29% on MoLRG at n = 16)."""
    d = (a.double() - b.double()).reshape(a.shape[0], -1)
    return float(d.square().mean(dim=1).sqrt().mean())


@torch.no_grad()
def evaluate(net, X_train, posterior, sigmas, n_eval, n_pairs, seed):
    from ..hidden_gaussian import GaussianDenoiser, OptimalDenoiser, linearity_score

    gauss = GaussianDenoiser.fit(X_train)
    optimal = OptimalDenoiser(X_train)
    g = torch.Generator().manual_seed(seed + 1)
    out = {k: [] for k in ("sigma", "rmse_gaussian", "rmse_optimal", "rmse_posterior",
                           "rmse_optimal_vs_gaussian")}
    for s in sigmas:
        idx = torch.randint(0, X_train.shape[0], (n_eval,), generator=g)
        x = X_train[idx] + s * torch.randn(n_eval, X_train.shape[1], generator=g)
        y = net(x, s)
        y_opt = optimal(x, s)
        y_g = gauss(x, s)
        out["sigma"].append(float(s))
        out["rmse_gaussian"].append(_rmse(y, y_g))
        out["rmse_optimal"].append(_rmse(y, y_opt))
        out["rmse_posterior"].append(_rmse(y, posterior(x, s)))
        out["rmse_optimal_vs_gaussian"].append(_rmse(y_opt, y_g))
    gl = torch.Generator().manual_seed(seed + 2)
    out["linearity"] = linearity_score(net, X_train, sigmas, n_pairs, generator=gl).tolist()
    gl = torch.Generator().manual_seed(seed + 2)
    out["linearity_optimal"] = linearity_score(optimal, X_train, sigmas, n_pairs,
                                               generator=gl).tolist()
    return out


def run_one(cfg: RunConfig, progress=None) -> dict:
    from ..modules import SubspaceDAE

    seed = cfg.seed * 1000003 + cfg.N * 31 + (0 if cfg.dataset == "molrg" else 17)
    if cfg.dataset == "molrg":
        X, U = molrg_data(cfg.N, cfg.molrg_n, cfg.molrg_K, cfg.molrg_d, cfg.seed)
        post = SubspaceDAE(cfg.molrg_n, [cfg.molrg_d] * cfg.molrg_K, U=U)
    elif cfg.dataset == "digits":
        Xall, labels = digits_data()
        if cfg.N > Xall.shape[0]:
            raise ValueError(f"hidden-gaussian: digits has {Xall.shape[0]} images, N = {cfg.N}")
        perm = torch.randperm(Xall.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
        X = Xall[perm[: cfg.N]]
        U = fitted_molrg_bases(Xall, labels, cfg.digits_d)
        pi = torch.bincount(labels).double()
        post = SubspaceDAE(X.shape[1], [cfg.digits_d] * U.shape[0], U=U, pi=pi.tolist())
    else:
        raise ValueError(f"hidden-gaussian: unknown dataset {cfg.dataset!r}")
    post.eval()
    net = train_denoiser(X, cfg.steps, cfg.hidden, cfg.batch, seed, progress)
    from ..metrics.linearity import edm_sigma_grid

    sigmas = edm_sigma_grid(cfg.n_sigmas).tolist()
    res = evaluate(net, X, lambda x, s: post(x, s).detach(), sigmas, cfg.n_eval, cfg.n_pairs,
                   seed)
    return {"config": asdict(cfg), "key": cfg.key(), **res}


# ------------------------------------------------------------------------------------- plotting
def plot(results: list[dict], path: str) -> None:
    from matplotlib import colormaps

    datasets = sorted({r["config"]["dataset"] for r in results})
    cols = [("rmse_gaussian", "RMSE to Gaussian denoiser"),
            ("rmse_optimal", "RMSE to multi-delta (optimal) denoiser"),
            ("rmse_posterior", "RMSE to MoLRG posterior mean"),
            ("linearity", "linearity score")]
    fig, axes = subplots(len(datasets), len(cols), squeeze=False,
                         figsize=(4.2 * len(cols), 3.4 * len(datasets)))
    for i, ds in enumerate(datasets):
        rs = sorted((r for r in results if r["config"]["dataset"] == ds),
                    key=lambda r: r["config"]["N"])
        cmap = colormaps["viridis"]
        for j, (key, title) in enumerate(cols):
            ax = axes[i, j]
            for m, r in enumerate(rs):
                ax.plot(r["sigma"], r[key], "o-", ms=3, color=cmap(m / max(1, len(rs) - 1)),
                        label=f"N={r['config']['N']}")
                if key == "linearity":
                    ax.plot(r["sigma"], r["linearity_optimal"], ":", color=cmap(
                        m / max(1, len(rs) - 1)))
            ax.set_xscale("log")
            ax.set_xlabel("sigma")
            ax.set_title(f"{ds}: {title}", fontsize=9)
            if j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Network denoisers vs Gaussian / multi-delta / MoLRG denoisers "
                 "(dotted: linearity of the multi-delta denoiser)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", type=out_dir(), default="results/hidden_gaussian", help="output folder")
    p.add_argument("--datasets", default="molrg,digits", help="comma list: molrg, digits")
    p.add_argument("--sizes", type=int_list(1), default=None,
                   help="comma list of training-set sizes N")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="training steps per network")
    p.add_argument("--hidden", type=width_int, default=None, help="MLP width (at most 2**20)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--molrg-n", type=int_at_least(1), default=16)
    p.add_argument("--molrg-K", type=int_at_least(1), default=2)
    p.add_argument("--molrg-d", type=int_at_least(1), default=3)
    p.add_argument("--digits-d", type=int_at_least(1), default=6)
    p.add_argument("--threads", type=threads_int, default=1,
                   help="torch CPU threads (at most 4096)")


def _ints(text: str, name: str) -> list[int]:
    """``--sizes`` given as text by a caller's own Namespace (the CLI parses it with int_list)."""
    try:
        return int_list(1)(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"hidden-gaussian: {name} {e}") from None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    pre = dict(PRESETS[args.preset])
    if args.sizes is not None:  # "" is an error, not the preset's sizes
        pre["sizes"] = _ints(args.sizes, "--sizes") if isinstance(args.sizes, str) else args.sizes
    if args.steps is not None:
        pre["steps"] = args.steps
    if args.hidden is not None:
        pre["hidden"] = args.hidden
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if not datasets:
        raise ValueError("hidden-gaussian: --datasets names no dataset (molrg, digits)")
    for d in datasets:
        if d not in ("molrg", "digits"):
            raise ValueError(f"hidden-gaussian: unknown dataset {d!r} in --datasets (molrg, digits)")
    if pre["steps"] < 1 or pre["hidden"] < 1:
        raise ValueError("hidden-gaussian: --steps and --hidden must be >= 1")
    if "molrg" in datasets and args.molrg_K * args.molrg_d > args.molrg_n:
        raise ValueError("hidden-gaussian: need --molrg-K * --molrg-d <= --molrg-n")
    if "digits" in datasets:  # checked before any network trains, not when the digits run starts
        n_digits, n_pix = (int(v) for v in digits_data()[0].shape)
        if max(pre["sizes"]) > n_digits:
            raise ValueError(f"hidden-gaussian: --sizes {max(pre['sizes'])} exceeds the "
                             f"{n_digits} digits images")
        if args.digits_d > n_pix:
            raise ValueError(f"hidden-gaussian: --digits-d must be <= {n_pix} (8 x 8 images)")
    cfgs = [RunConfig(ds, N, pre["steps"], pre["hidden"], pre["batch"], pre["n_eval"],
                      pre["n_sigmas"], pre["n_pairs"], args.seed, args.molrg_n, args.molrg_K,
                      args.molrg_d, args.digits_d)
            for ds in datasets for N in pre["sizes"]]
    run_dir = os.path.join(args.out, "runs")
    os.makedirs(run_dir, exist_ok=True)
    results, todo = [], []
    for c in cfgs:
        path = os.path.join(run_dir, f"{c.dataset}_N{c.N}_{c.key()}.json")
        saved = read_json(path)  # a file that does not parse is moved aside and the run redone
        if saved is not None:
            results.append(saved)
        else:
            todo.append((c, path))
    if len(todo) < len(cfgs):
        print(f"hidden-gaussian: {len(cfgs) - len(todo)} finished runs found in {run_dir}")
    with tqdm(total=sum(c.steps for c, _ in todo), desc="training", unit="step") as bar:
        for c, path in todo:
            bar.set_postfix(dataset=c.dataset, N=c.N)
            res = run_one(c, bar)
            write_json(path, res)
            results.append(res)
    write_json(os.path.join(args.out, "hidden_gaussian.json"), results)
    plot(results, os.path.join(args.out, "hidden_gaussian.png"))
    for r in sorted(results, key=lambda r: (r["config"]["dataset"], r["config"]["N"])):
        mid = min(range(len(r["sigma"])), key=lambda i: abs(math.log(r["sigma"][i] / 0.5)))
        print(f"{r['config']['dataset']:>6} N={r['config']['N']:>5}  sigma={r['sigma'][mid]:.3f}: "
              f"rmse gauss {r['rmse_gaussian'][mid]:.3f}  optimal {r['rmse_optimal'][mid]:.3f}  "
              f"posterior {r['rmse_posterior'][mid]:.3f}  LS {r['linearity'][mid]:.3f}")
    print(f"wrote {args.out}/hidden_gaussian.json and hidden_gaussian.png")
    return 0
