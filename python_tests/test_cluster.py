import numpy as np
import pytest
import torch

from molrg_ext.cluster import EnSC, KSubspaces, PCASubspace
from molrg_ext.data import sample_molrg
from molrg_ext.metrics import clustering_accuracy, recovery_success, subspace_distance
from molrg_ext.modules import random_orthonormal
from molrg_ext.ops import hard_assign, subspace_dae
from molrg_ext.posterior import posterior_mean_coefficients
from molrg_ext.schedules import VP


pytestmark = pytest.mark.usefixtures("one_thread")


def rate(est, data, dims):
    U = torch.stack([est.fit(data.X[p]).bases_ for p in range(data.instances)])
    return recovery_success(subspace_distance(U, data.bases, dims)).double().mean().item()


@pytest.mark.parametrize("d", [2, 5])
def test_pca_phase_transition_at_N_equals_d(d):
    for N, expect in ((d - 1, 0.0), (d, 1.0), (d + 3, 1.0)):
        data = sample_molrg(48, [d], counts=[N], instances=5, seed=N, dtype=torch.float64)
        assert rate(PCASubspace(d), data, [d]) == expect, (d, N)


def test_pca_matches_numpy_svd_subspace():
    data = sample_molrg(20, [3], N=40, noise_std=0.05, seed=0, dtype=torch.float64)
    U = PCASubspace(3).fit(data.X[0].numpy()).bases_[0]
    u = np.linalg.svd(data.X[0].numpy().T)[0][:, :3]
    assert np.allclose(U.numpy() @ U.numpy().T, u @ u.T, atol=1e-10)


@pytest.mark.parametrize("est", [KSubspaces(2, 4, n_init=10, seed=0),
                                 KSubspaces(2, 4, n_init=1, init="spectral", seed=0),
                                 EnSC(2, 4, seed=0)], ids=["kss-random", "kss-spectral", "ensc"])
def test_subspace_clustering_succeeds_at_2d_fails_at_half_d(est):
    good = sample_molrg(48, [4, 4], counts=[8, 8], instances=6, seed=1, dtype=torch.float64)
    bad = sample_molrg(48, [4, 4], counts=[2, 2], instances=6, seed=2, dtype=torch.float64)
    assert rate(est, good, [4, 4]) >= 0.8
    assert rate(est, bad, [4, 4]) == 0.0
    acc = clustering_accuracy(good.labels[0], est.fit(good.X[0]).labels_)
    assert acc.item() == 1.0


def test_kss_heterogeneous_dims_and_objective():
    data = sample_molrg(30, [2, 5], counts=[12, 20], seed=3, dtype=torch.float64)
    est = KSubspaces(2, [2, 5], n_init=5, seed=1).fit(data.X[0])
    assert est.bases_.shape == (2, 30, 5)
    assert subspace_distance(est.bases_, data.bases[0], dims=[2, 5]).item() < 1e-8
    assert np.isclose(est.objective_, data.X[0].pow(2).sum().item())  # noise free: all energy


def test_theorem3_hard_loss_is_affine_decreasing_in_clustering_objective():
    """For fixed orthonormal U, loss (6) of the hard-max DAE (16) = const - a * objective (18),
    a > 0 (Theorem 3). The eps-expectation is exact: E||c U_k U_k^T(s x + g eps) - x||^2 =
    ||c s U_k U_k^T x - x||^2 + c^2 g^2 d_k, the first term evaluated with the op."""
    K, d, n = 2, 3, 12
    data = sample_molrg(n, [d] * K, counts=[5, 5], seed=4, dtype=torch.float64)
    X = data.X[0]
    sched = VP()
    t, s, sigma, lam = sched.levels(16)
    gamma = s * sigma
    c, phi, _ = posterior_mean_coefficients(s, gamma)
    g = torch.Generator().manual_seed(0)
    losses, objs = [], []
    for trial in range(8):
        U = random_orthonormal(n, d, K, generator=g, dtype=torch.float64)
        if trial % 2:  # include near-optimal U so the objective spans a wide range
            U = data.bases[0] + 0.3 * torch.randn(K, n, d, generator=g, dtype=torch.float64)
            U = torch.linalg.qr(U)[0]
        assign = hard_assign(X, U)
        loss = 0.0
        for l in range(len(t)):
            y = subspace_dae(s[l] * X, U, c[l], phi[l], dims=[d] * K, mode="hard", assign=assign)
            err = (y - X).pow(2).sum(1).mean() + (c[l] * gamma[l]) ** 2 * d
            loss += lam[l] * err
        losses.append(loss.item())
        objs.append(sum((X[assign == k] @ U[k]).pow(2).sum().item() for k in range(K)))
    A = np.stack([np.ones(8), objs], 1)
    coef, res, *_ = np.linalg.lstsq(A, np.array(losses), rcond=None)
    assert coef[1] < 0
    assert np.allclose(A @ coef, losses, rtol=1e-10, atol=1e-10)
    a_pred = (lam * (2 * c * s - (c * s) ** 2)).sum().item() / X.shape[0]
    assert np.isclose(-coef[1], a_pred, rtol=1e-8)
    assert np.ptp(objs) > 1.0


@pytest.mark.parametrize("make", [lambda: PCASubspace(3), lambda: KSubspaces(2, 3),
                                  lambda: EnSC(2, 3)])
def test_estimators_reject_bad_input(make):
    X = torch.randn(10, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN"):
        make().fit(torch.where(torch.arange(8) == 2, float("nan"), X))
    with pytest.raises(ValueError, match="\\[N, n\\]"):
        make().fit(X[None])
    with pytest.raises(ValueError, match="empty"):
        make().fit(X[:0])
    with pytest.raises(ValueError, match="must be < n"):
        make().fit(X[:, :3])
    if not isinstance(make(), PCASubspace):
        with pytest.raises(ValueError, match="K = 2 clusters but only N = 1"):
            make().fit(X[:1])


def test_estimator_option_errors():
    X = torch.randn(10, 8)
    with pytest.raises(ValueError, match="init"):
        KSubspaces(2, 3, init="kmeans").fit(X)
    with pytest.raises(ValueError, match="dims must have K"):
        KSubspaces(2, [3, 3, 3]).fit(X)
    with pytest.raises(ValueError, match="K must be >= 1"):
        KSubspaces(0, []).fit(X)
    with pytest.raises(ValueError, match="alpha"):
        EnSC(2, 3, alpha=-1).fit(X)
    assert KSubspaces(2, 3).fit(X).bases_.dtype == torch.float32
