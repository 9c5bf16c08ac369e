"""Lemma 1 / Proposition 1: the denoiser with U = U* and the exact coefficients is E[x0 | xt]."""
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import molrg_ext


def posterior_mean_by_conditioning(xt, bases, pi, s, gamma):
    """E[x0 | xt] for x0 ~ sum_k pi_k N(0, U_k U_k^T), xt = s x0 + gamma eps, from Gaussian
    conditioning per component and mixture responsibilities from the component densities."""
    n = xt.shape[-1]
    eye = torch.eye(n, dtype=xt.dtype)
    log_r, means = [], []
    for Uk, pk in zip(bases, pi):
        cov_x0 = Uk @ Uk.T
        cov_xt = s**2 * cov_x0 + gamma**2 * eye
        log_r.append(math.log(pk) + MultivariateNormal(torch.zeros(n, dtype=xt.dtype),
                                                       cov_xt).log_prob(xt))
        # E[x0 | xt, k] = Cov(x0, xt) Cov(xt)^{-1} xt
        means.append(torch.linalg.solve(cov_xt, xt.T).T @ (s * cov_x0).T)
    r = torch.softmax(torch.stack(log_r, -1), -1)
    return sum(r[:, k : k + 1] * means[k] for k in range(len(bases)))


@pytest.mark.parametrize("dims,pi", [([3, 3], [0.5, 0.5]), ([2, 5, 3], [0.2, 0.5, 0.3]),
                                     ([4, 1], [0.9, 0.1])])
@pytest.mark.parametrize("s,gamma", [(1.0, 0.3), (0.8, 1.5), (1.0, 0.05)])
def test_posterior_mean_matches_gaussian_mixture(dims, pi, s, gamma):
    g = torch.Generator().manual_seed(1)
    n, K, dm = 12, len(dims), max(dims)
    Q = molrg_ext.random_orthonormal(n, sum(dims), generator=g, dtype=torch.float64)
    U = torch.zeros(K, n, dm, dtype=torch.float64)
    bases, start = [], 0
    for k, d in enumerate(dims):
        U[k, :, :d] = Q[:, start : start + d]
        bases.append(Q[:, start : start + d])
        start += d
    # x_t drawn from the model itself, so every component is represented
    labels = torch.multinomial(torch.tensor(pi), 40, replacement=True, generator=g)
    x0 = torch.stack([bases[k] @ torch.randn(dims[k], generator=g, dtype=torch.float64)
                      for k in labels.tolist()])
    xt = s * x0 + gamma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    c, phi, bias = molrg_ext.posterior_mean_coefficients(s, gamma, dims, pi)
    y = molrg_ext.subspace_dae(xt, U, c, phi, bias, dims)
    torch.testing.assert_close(y, posterior_mean_by_conditioning(xt, bases, pi, s, gamma),
                               rtol=1e-9, atol=1e-10)


def test_coefficients_closed_form_and_shapes():
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    c, phi, bias = molrg_ext.posterior_mean_coefficients(1.0, sigma, dims=[2, 3])
    torch.testing.assert_close(c, 1 / (1 + sigma**2))
    torch.testing.assert_close(phi, 1 / (2 * sigma**2 * (1 + sigma**2)))
    assert bias.shape == (3, 2)
    # beta_k difference only through d_k: -(d_2 - d_1)/2 log((1 + sigma^2) / sigma^2)
    torch.testing.assert_close(bias[:, 1] - bias[:, 0], -0.5 * torch.log1p(1 / sigma**2))
    c2, phi2, b2 = molrg_ext.posterior_mean_coefficients(1.0, 0.5)
    assert b2 is None and c2.dim() == 0


@pytest.mark.parametrize("kw,match", [
    (dict(s=1.0, gamma=0.0), "gamma must be finite and > 0"),
    (dict(s=-1.0, gamma=1.0), "s must be finite and > 0"),
    (dict(s=1.0, gamma=float("nan")), "gamma must be finite"),
    (dict(s=1.0, gamma=1.0, dims=[1, 2], pi=[1.0]), "dims must have K = 1 entries, got 2"),
    (dict(s=1.0, gamma=1.0, pi=[0.5, -0.5]), "pi must be finite and >= 0"),
    (dict(s=1.0, gamma=1.0, dims=[]), "K = 0"),
    (dict(s=1.0, gamma=1.0, pi=[0.0, 0.0]), "pi must be .*not all zero"),
    (dict(s=1.0, gamma=1.0, dims=[0, 2]), "dims\\[0\\] must be >= 1"),
    (dict(s=1.0, gamma=1.0, dims=[-1, 2]), "dims\\[0\\] must be >= 1"),
])
def test_coefficients_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        molrg_ext.posterior_mean_coefficients(**kw)


def test_subspace_dae_module_is_posterior_mean_and_trains():
    g = torch.Generator().manual_seed(0)
    n, dims = 10, [2, 3]
    Q = molrg_ext.random_orthonormal(n, 5, generator=g, dtype=torch.float64)
    U = torch.zeros(2, n, 3, dtype=torch.float64)
    U[0, :, :2], U[1, :, :3] = Q[:, :2], Q[:, 2:]
    model = molrg_ext.SubspaceDAE(n, dims, U=U, pi=[0.3, 0.7], dtype=torch.float64)
    xt = torch.randn(6, n, generator=g, dtype=torch.float64)
    sigma = torch.full((6,), 0.4, dtype=torch.float64)
    c, phi, bias = molrg_ext.posterior_mean_coefficients(1.0, sigma, dims, [0.3, 0.7])
    torch.testing.assert_close(model(xt, sigma), molrg_ext.subspace_dae(xt, U, c, phi, bias, dims))
    loss = model(xt, 0.4).square().sum()
    loss.backward()
    assert model.U.grad is not None and model.U.grad.abs().sum() > 0
    model.U.data += 0.1 * torch.randn(model.U.shape, generator=g, dtype=torch.float64)
    model.orthonormalize_()
    for Uk in model.bases():
        torch.testing.assert_close(Uk.T @ Uk, torch.eye(Uk.shape[1], dtype=torch.float64))
    assert torch.all(model.U[0, :, 2:] == 0)
    assert model.assign(xt).shape == (6,)


def test_subspace_dae_module_t_and_sigma():
    """forward(t=) takes s and sigma from the schedule; giving sigma or s too is an error (t used
    to override them silently)."""
    from molrg_ext.schedules import VP

    g = torch.Generator().manual_seed(3)
    m = molrg_ext.SubspaceDAE(8, [2, 3], schedule=VP(), dtype=torch.float64, generator=g)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    torch.testing.assert_close(m(x, t=t), m(x, VP().sigma(t), s=VP().s(t)))
    with pytest.raises(ValueError, match="either sigma"):
        m(x, 0.1, t=0.4)
    with pytest.raises(ValueError, match="either sigma"):
        m(x, s=1.0, t=0.4)


def test_subspace_dae_module_instances_and_errors():
    m = molrg_ext.SubspaceDAE(8, 2, K=3, instances=4, mode="hard")
    assert m.U.shape == (4, 3, 8, 2)
    assert m(torch.randn(4, 5, 8), 0.5).shape == (4, 5, 8)
    with pytest.raises(ValueError, match="K is required"):
        molrg_ext.SubspaceDAE(8, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        molrg_ext.SubspaceDAE(8, [2], mode="median")
    with pytest.raises(ValueError, match="exceeds the ambient dimension"):
        molrg_ext.SubspaceDAE(3, [4])
    with pytest.raises(ValueError, match="pass sigma or t"):
        m(torch.randn(4, 5, 8))
    for kw in (dict(pi=[0, 0]), dict(pi=[float("nan"), 1]), dict(pi=[1, -1]), dict(pi=[1, 1, 1])):
        with pytest.raises(ValueError, match="pi must be K = 2 finite weights"):
            molrg_ext.SubspaceDAE(8, [2, 2], **kw)
    for kw, err, match in ((dict(instances=0), ValueError, r"instances must be in \[1, "),
                           (dict(instances=-1), ValueError, r"instances must be in \[1, "),
                           (dict(instances=2.0), TypeError, "instances must be an int"),
                           (dict(dims=[2.5, 2]), TypeError, "dims\\[0\\] must be an int"),
                           (dict(dims=2, K=2.5), TypeError, "K must be an int"),
                           (dict(dims=[2, 2], K=0), ValueError, "K must be >= 1")):
        kw = {"dims": [2, 2], **kw}
        with pytest.raises(err, match=match):
            molrg_ext.SubspaceDAE(8, **kw)


def test_random_orthonormal_bad_input():
    with pytest.raises(ValueError, match="d = 5 orthonormal columns need d <= n = 3"):
        molrg_ext.random_orthonormal(3, 5)
    with pytest.raises(TypeError, match="d must be an int"):
        molrg_ext.random_orthonormal(3, 2.5)
    with pytest.raises(ValueError, match="batch\\[0\\] must be >= 0"):
        molrg_ext.random_orthonormal(4, 2, -1)
    Q = molrg_ext.random_orthonormal(5, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(Q.transpose(-1, -2) @ Q, torch.eye(5, dtype=torch.float64).expand(3, 5, 5))


def test_coefficients_at_extreme_scales_are_not_nan():
    """Where s^2 or gamma^2 over- or underflows, the coefficients come from gamma / s: finite
    where representable, +inf for a phi beyond float64 (s = 1e200, gamma = 1e-200 gave NaN)."""
    f = molrg_ext.posterior_mean_coefficients
    c, phi, bias = f(1e200, 1.0, dims=[2, 3])
    torch.testing.assert_close(c, torch.tensor(1e-200, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(phi, torch.tensor(0.5, dtype=torch.float64))
    # bias: log(1/2) - d/2 log(s^2 / gamma^2) = log(1/2) - d log(1e200)
    want = torch.log(torch.tensor(0.5, dtype=torch.float64)) - torch.tensor([2.0, 3.0],
                                                                              dtype=torch.float64) * 200 * torch.log(torch.tensor(10.0, dtype=torch.float64))
    torch.testing.assert_close(bias, want)
    c, phi, _ = f(1e200, 1e-200)
    assert c.item() == pytest.approx(1e-200) and phi.item() == float("inf")
    c, phi, _ = f(1e-200, 1e-200)  # c = 1 / (2 s), phi = 1 / (4 gamma^2) overflows
    assert c.item() == pytest.approx(5e199) and phi.item() == float("inf")
    # ordinary values are computed as before, exactly
    s, g = torch.tensor([0.3, 2.0], dtype=torch.float64), torch.tensor([0.1, 3.0], dtype=torch.float64)
    c, phi, _ = f(s, g)
    assert torch.equal(c, s / (s * s + g * g)) and torch.equal(phi, s * s / (2 * g * g * (s * s + g * g)))
