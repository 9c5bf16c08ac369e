"""EDM Heun and DDIM samplers, driven by exact posterior-mean denoisers."""
import warnings

import numpy as np
import pytest
import torch

from molrg_ext import SubspaceDAE, random_orthonormal
from molrg_ext.schedules import EDM
from molrg_ext.sampling import ddim_sample, default_sigma_steps, heun_sample

DT = torch.float64


def _bases(n, dims, seed=0):
    Q = random_orthonormal(n, sum(dims), generator=torch.Generator().manual_seed(seed), dtype=DT)
    U = torch.zeros(len(dims), n, max(dims), dtype=DT)
    off = 0
    for k, d in enumerate(dims):
        U[k, :, :d] = Q[:, off:off + d]
        off += d
    return U


def test_default_grid_is_edm():
    s = default_sigma_steps(18)
    rho, lo, hi = 7.0, 0.002, 80.0
    i = np.arange(18)
    ref = (hi ** (1 / rho) + i / 17 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-12)


def test_heun_deterministic_and_trajectory_layout():
    U = _bases(16, [2, 3])
    m = SubspaceDAE(16, [2, 3], U=U, dtype=DT)
    z = torch.randn(7, 16, generator=torch.Generator().manual_seed(1), dtype=DT)
    tr = heun_sample(m, z, return_trajectory=True)
    assert tr.x.shape == (19, 7, 16) and tr.sigma.shape == (19,) and tr.denoised.shape == (18, 7, 16)
    assert tr.sigma[-1] == 0 and tr.sigma[0] == pytest.approx(80.0)
    torch.testing.assert_close(tr.x[0], 80.0 * z)
    torch.testing.assert_close(heun_sample(m, z), tr.x[-1], rtol=0, atol=0)


def test_heun_exact_denoiser_samples_recover_subspaces():
    """Heun + E[x0|x_t] for U* gives samples on the union of the subspaces, in both clusters, with
    per-cluster PCA spanning U*_k (Lemma 1 denoiser, 18-step EDM grid)."""
    n, dims = 24, [3, 5]
    U = _bases(n, dims, seed=3)
    m = SubspaceDAE(n, dims, U=U, dtype=DT)
    z = torch.randn(600, n, generator=torch.Generator().manual_seed(0), dtype=DT)
    x = heun_sample(m, z)
    energy = torch.stack([(U[k, :, :d].T @ x.T).norm(dim=0) for k, d in enumerate(dims)])
    label = energy.argmax(0)
    frac = energy.max(0).values / x.norm(dim=1)
    assert frac.min() > 0.999
    share = (label == 0).double().mean().item()
    assert 0.4 < share < 0.6
    for k, d in enumerate(dims):
        Xk = x[label == k]
        _, S, Vh = torch.linalg.svd(Xk, full_matrices=False)
        V = Vh[:d].T
        Uk = U[k, :, :d]
        dist = torch.linalg.matrix_norm(V @ V.T - Uk @ Uk.T, ord=2)
        assert dist < 1e-6
        # mean variance per direction close to 1 (the data covariance); 18 Heun steps overshoot
        # by about 10% (see test_samplers_match_gaussian_closed_form for the convergence)
        var = float((S[:d] ** 2).sum() / len(Xk) / d)
        assert 0.85 < var < 1.25, var


def test_samplers_match_gaussian_closed_form():
    """K = 1: the PF-ODE maps x_T = sigma_T z to x_0 = U U^T z sigma_T / sqrt(1 + sigma_T^2)."""
    n, d = 10, 4
    U = _bases(n, [d], seed=5)
    m = SubspaceDAE(n, [d], U=U, dtype=DT)
    z = torch.randn(50, n, generator=torch.Generator().manual_seed(2), dtype=DT)
    exact = (z @ U[0] @ U[0].T) * 80.0 / (1 + 80.0 ** 2) ** 0.5

    def err(sampler, steps):
        return float((sampler(m, z, default_sigma_steps(steps)) - exact).norm() / exact.norm())

    h60, h120 = err(heun_sample, 60), err(heun_sample, 120)
    d200, d400 = err(ddim_sample, 200), err(ddim_sample, 400)
    assert h60 < 1e-2 and d400 < 5e-2
    # Heun is second order (error / 4 when the steps double), DDIM (Euler) first order (/ 2)
    assert 0.15 < h120 / h60 < 0.35, (h60, h120)
    assert 0.35 < d400 / d200 < 0.65, (d200, d400)


def test_ddim_scales_only_rescale_the_trajectory():
    U = _bases(12, [3, 3], seed=7)
    m = SubspaceDAE(12, [3, 3], U=U, dtype=DT)
    z = torch.randn(9, 12, generator=torch.Generator().manual_seed(4), dtype=DT)
    sig = default_sigma_steps(12)
    s = 1 / torch.sqrt(1 + sig ** 2)  # VP-type signal scales
    ve = ddim_sample(m, z, sig, return_trajectory=True)
    vp = ddim_sample(m, z, sig, scales=s, return_trajectory=True)
    torch.testing.assert_close(vp.x[:-1], ve.x[:-1] * s[:, None, None])
    torch.testing.assert_close(vp.x[-1], ve.x[-1])


def test_subspace_dae_rank_along_trajectory_lemma2():
    """Lemma 2: the exact denoiser's Jacobian rank stays in [min d_k, D] along Heun trajectories,
    D = sum d_k at high noise and min d_k ... d_max at low noise."""
    n, dims = 20, [2, 4]
    U = _bases(n, dims, seed=11)
    m = SubspaceDAE(n, dims, U=U, dtype=DT)
    z = torch.randn(6, n, generator=torch.Generator().manual_seed(5), dtype=DT)
    tr = heun_sample(m, z, return_trajectory=True)
    ranks = np.zeros((18, 6), dtype=int)
    for i in range(18):
        for b in range(6):
            J = torch.autograd.functional.jacobian(
                lambda v: m(v[None], tr.sigma[i])[0], tr.x[i, b])
            s2 = np.linalg.svd(J.numpy(), compute_uv=False) ** 2
            ranks[i, b] = int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.99 ** 2, side="right") + 1)
    assert ranks.min() >= min(dims) and ranks.max() <= sum(dims)
    assert (ranks[0] == sum(dims)).all()  # sigma = 80: both subspaces equally weighted
    assert set(ranks[-1]) <= set(dims)  # sigma = 0.002: one subspace selected


def test_sampler_bad_inputs():
    m = SubspaceDAE(8, [2], U=_bases(8, [2]), dtype=DT)
    z = torch.randn(3, 8, dtype=DT)
    with pytest.raises(ValueError, match="decreasing"):
        heun_sample(m, z, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="sigmas"):
        heun_sample(m, z, torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="NaN"):
        heun_sample(m, torch.full((3, 8), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match="empty"):
        ddim_sample(m, z[:0])
    with pytest.raises(ValueError, match="scales"):
        ddim_sample(m, z, default_sigma_steps(5), scales=torch.ones(3))
    with pytest.raises(ValueError, match="num_steps"):
        default_sigma_steps(1)
    with pytest.raises(TypeError, match="num_steps must be an int, got 2.7"):
        heun_sample(m, z, num_steps=2.7)
    with pytest.raises(ValueError, match=r"sigmas must be 1-D, got shape \(2, 2\)"):
        heun_sample(m, z, torch.tensor([[3.0, 2.0], [1.0, 0.5]]))
    with pytest.raises(TypeError, match="denoiser returned dtype torch.float32"):
        heun_sample(lambda x, s: x.float(), z, num_steps=3)
    # a grid with its trailing 0 (EDM.sigma_steps) is accepted and gives the same result
    torch.testing.assert_close(heun_sample(m, z, EDM().sigma_steps(6)), heun_sample(m, z, num_steps=6))


def test_sampler_warns_for_a_module_in_training_mode():
    """Dropout in training mode made two samples of the same noise differ (by 0.056 at 4 steps):
    the samplers warn; after .eval() they are deterministic and silent."""
    import warnings

    from molrg_ext.models import make_unet_denoiser

    net = make_unet_denoiser((2, 8, 8), model_channels=8, dropout=0.1)
    z = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="dropout or batch normalisation in training mode"):
        heun_sample(net, z, num_steps=3)
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = heun_sample(net, z, num_steps=3), heun_sample(net, z, num_steps=3)
    assert torch.equal(a, b)


def test_sampler_warns_only_where_the_mode_changes_the_output():
    """SubspaceDAE, a plain Linear stack and dropout with p = 0 compute the same in both modes:
    no warning (it had fired for every SubspaceDAE, the rank-vs-snr experiment's
    included). Batch norm in training mode, a dropout submodule left in training mode inside an
    eval() parent, and attention dropout warn; both samplers check."""
    import warnings

    class Wrap(torch.nn.Module):
        def __init__(self, *layers):
            super().__init__()
            self.body = torch.nn.Sequential(*layers)

        def forward(self, x, sigma):
            return self.body(x)

    z = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    dae = SubspaceDAE(12, [3, 2])
    quiet = [dae, Wrap(torch.nn.Linear(12, 12)),
             Wrap(torch.nn.Dropout(0.0), torch.nn.Linear(12, 12))]
    assert all(m.training for m in quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m in quiet:
            heun_sample(m, z, num_steps=3)
            ddim_sample(m, z, num_steps=3)
    inner = torch.nn.Dropout(0.2)
    parent = Wrap(torch.nn.Linear(12, 12), inner).eval()
    inner.train()  # one submodule left in training mode
    with_attn = Wrap(torch.nn.Linear(12, 12))
    with_attn.attn = torch.nn.MultiheadAttention(12, 2, dropout=0.1)  # seen, though unused here
    for m in (Wrap(torch.nn.BatchNorm1d(12)), parent, with_attn):
        for sampler in (heun_sample, ddim_sample):
            with pytest.warns(UserWarning, match="in training mode"):
                sampler(m, z, num_steps=3)


def test_heun_takes_the_euler_step_where_the_correction_would_amplify_rounding():
    """float32, sigmas [80, 1, 1e-10]: Heun's correction at the last step divided the
    denoiser's rounding error by 1e-10, and the samples ended 62 away from the training points
    they belong to (float64: 3e-8). That step now takes the Euler step, with a warning; grids with
    moderate ratios run exactly as before, without one."""
    from molrg_ext.hidden_gaussian import OptimalDenoiser

    g = torch.Generator().manual_seed(0)
    Xt = torch.randn(50, 8, dtype=torch.float64, generator=g)
    noise = torch.randn(4, 8, dtype=torch.float64, generator=g)
    den = OptimalDenoiser(Xt.float())
    with pytest.warns(UserWarning, match=r"heun_sample: 1 step\(s\) shrink sigma by too large a "
                                         r"factor for torch.float32 \(first: 1 -> 1e-10\)"):
        x = heun_sample(den, noise.float(), sigmas=[80.0, 1.0, 1e-10])
    assert torch.cdist(x.double(), Xt).min(1).values.max().item() < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x64 = heun_sample(OptimalDenoiser(Xt), noise, sigmas=[80.0, 1.0, 1e-10])  # ratio ok
        assert torch.cdist(x64, Xt).min(1).values.max().item() < 1e-6
        t = torch.tensor([80.0, 10.0, 1.0, 0.1])
        a = heun_sample(den, noise.float(), sigmas=t)
    # the same moderate grid by hand: every step with Heun's correction, then Euler to 0
    x = noise.float() * t[0]
    for i in range(3):
        d0 = den(x, t[i].expand(4))
        s0 = (x - d0) / t[i]
        xe = x + (t[i + 1] - t[i]) * s0
        s1 = (xe - den(xe, t[i + 1].expand(4))) / t[i + 1]
        x = x + (t[i + 1] - t[i]) * 0.5 * (s0 + s1)
    x = x + (0 - t[3]) * ((x - den(x, t[3].expand(4))) / t[3])
    assert torch.equal(a, x)


@pytest.mark.parametrize("sampler", [heun_sample, ddim_sample])
def test_samplers_keep_no_trajectory_unless_asked(sampler):
    """Every state and denoiser output was appended to lists even with return_trajectory=False:
    (2 steps + 1) x the batch of memory (409 MB for 200 steps of B = 1024, n = 256)."""
    import weakref

    refs, most_alive = [], [0]

    def denoiser(x, sigma):
        # earlier outputs still alive now are held by the sampler (tensors are freed by
        # reference counting, no cycle collection needed)
        most_alive[0] = max(most_alive[0], sum(r() is not None for r in refs))
        y = 0.5 * x
        refs.append(weakref.ref(y))
        return y

    noise = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sampler(denoiser, noise, num_steps=30)
    assert len(refs) >= 30
    assert most_alive[0] <= 2  # the current step's outputs only (it was every earlier one)
    traj = sampler(denoiser, noise, num_steps=30, return_trajectory=True)
    torch.testing.assert_close(traj.x[-1], out, rtol=0, atol=0)
    assert traj.x.shape[0] == 31
