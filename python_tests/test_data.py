import warnings

import numpy as np
import pytest
import torch

from molrg_ext.data import sample_from_bases, sample_molrg


def test_shapes_counts_and_padding():
    data = sample_molrg(20, [2, 5, 3], counts=[4, 6, 7], instances=3, seed=1)
    assert data.X.shape == (3, 17, 20) and data.X.dtype == torch.float32
    assert data.labels.shape == (3, 17)
    assert data.bases.shape == (3, 3, 20, 5)
    assert data.counts().tolist() == [[4, 6, 7]] * 3
    assert torch.all(data.bases[:, 0, :, 2:] == 0) and torch.all(data.bases[:, 2, :, 3:] == 0)


def test_orthogonal_bases_and_samples_lie_in_their_subspace():
    data = sample_molrg(16, [3, 4], counts=[5, 5], instances=2, seed=3, dtype=torch.float64)
    B = torch.cat([data.bases[:, 0, :, :3], data.bases[:, 1, :, :4]], dim=-1)
    eye = torch.eye(7, dtype=torch.float64)
    assert torch.allclose(B.transpose(-1, -2) @ B, eye.expand(2, 7, 7), atol=1e-12)
    for p in range(2):
        for i in range(10):
            k = data.labels[p, i]
            U = data.bases[p, k]
            x = data.X[p, i]
            assert torch.allclose(U @ (U.T @ x), x, atol=1e-12)
            assert x.norm() > 0


def test_independent_bases_overlap_and_are_orthonormal():
    data = sample_molrg(6, [4, 4], N=10, basis="independent", seed=0, dtype=torch.float64)
    U1, U2 = data.bases[0, 0], data.bases[0, 1]
    assert torch.allclose(U1.T @ U1, torch.eye(4, dtype=torch.float64), atol=1e-12)
    # 4 + 4 > 6: the two subspaces must intersect
    assert torch.linalg.svdvals(U1.T @ U2).max() > 0.99


def test_seeded_and_dtype_independent():
    a = sample_molrg(10, 2, K=2, N=30, instances=2, seed=7, dtype=torch.float64)
    b = sample_molrg(10, 2, K=2, N=30, instances=2, seed=7, dtype=torch.float32)
    c = sample_molrg(10, 2, K=2, N=30, instances=2, seed=8, dtype=torch.float64)
    assert torch.equal(a.labels, b.labels)
    assert torch.allclose(a.X.float(), b.X)
    assert not torch.allclose(a.X, c.X)
    assert not torch.allclose(a.X[0], a.X[1])  # instances differ


def test_pi_and_coefficient_statistics():
    data = sample_molrg(12, [2, 3], N=20000, pi=[0.2, 0.8], seed=2, dtype=torch.float64)
    frac = (data.labels == 1).double().mean().item()
    assert abs(frac - 0.8) < 0.02
    # the coefficients a = U_k^T x are standard normal: covariance ~ I_{d_k}
    sel = data.X[0, data.labels[0] == 1]
    a = sel @ data.bases[0, 1, :, :3]
    cov = a.T @ a / a.shape[0]
    assert torch.allclose(cov, torch.eye(3, dtype=torch.float64), atol=0.06)


def test_noise_std_adds_isotropic_noise():
    data = sample_molrg(30, [2], N=5000, noise_std=0.1, seed=4, dtype=torch.float64)
    U = data.bases[0, 0, :, :2]
    resid = data.X[0] - data.X[0] @ U @ U.T
    var = resid.pow(2).sum(1).mean().item() / 28  # residual lives in 28 dims
    assert abs(var - 0.01) < 0.001


def test_fresh_samples_same_bases_new_points():
    data = sample_molrg(16, [3, 3], counts=[10, 10], instances=2, seed=0, dtype=torch.float64)
    X2, lab2 = data.sample(N=50, seed=123)
    assert X2.shape == (2, 50, 16) and lab2.shape == (2, 50)
    for p in range(2):
        U = data.bases[p, lab2[p]]  # [50, n, d]
        proj = torch.einsum("mnd,mkd,mk->mn", U, U, X2[p])
        assert torch.allclose(proj, X2[p], atol=1e-12)
    X3, _ = sample_from_bases(data.bases, data.dims, counts=[10, 10], seed=0)
    assert not torch.allclose(X3, data.X)


def test_bad_input():
    with pytest.raises(ValueError, match="dims\\[0\\]"):
        sample_molrg(5, [6], N=3)
    with pytest.raises(ValueError, match="K = 0"):
        sample_molrg(5, [], N=3)
    with pytest.raises(ValueError, match="sum\\(dims\\)"):
        sample_molrg(5, [3, 3], N=3)
    with pytest.raises(ValueError, match="counts"):
        sample_molrg(10, [2, 2], counts=[1, 2, 3])
    with pytest.raises(ValueError, match="N = 4"):
        sample_molrg(10, [2, 2], N=4, counts=[1, 2])
    with pytest.raises(ValueError, match="give N or counts"):
        sample_molrg(10, [2, 2])
    with pytest.raises(ValueError, match="pi"):
        sample_molrg(10, [2, 2], N=4, pi=[0.5, float("nan")])
    with pytest.raises(ValueError, match="basis"):
        sample_molrg(10, [2], N=4, basis="sparse")
    with pytest.raises(ValueError, match="noise_std"):
        sample_molrg(10, [2], N=4, noise_std=-1)
    with pytest.raises(TypeError, match="dtype"):
        sample_molrg(10, [2], N=4, dtype=torch.int32)
    with pytest.raises(ValueError, match="instances"):
        sample_molrg(10, [2], N=4, instances=0)
    # counts and sizes are ints: floats (not truncated), bools and None name the argument
    for kw, match in ((dict(dims=[2.9, 1], N=4), "dims\\[0\\] must be an int"),
                      (dict(dims=[2, 1], counts=[1.9, 3]), "counts\\[0\\] must be an int"),
                      (dict(dims=[2, 1], N=True), "N must be an int"),
                      (dict(dims=[2, 1], N=4.0), "N must be an int"),
                      (dict(dims=[2, 1], N=4, seed=None), "seed must be an int"),
                      (dict(dims=2, K=2.5, N=4), "K must be an int"),
                      (dict(dims=[2, 1], N=4, instances=2.0), "instances must be an int")):
        with pytest.raises(TypeError, match=match):
            sample_molrg(10, **kw)
    with pytest.raises(ValueError, match=r"seed must be in \[0, "):
        sample_molrg(10, [2], N=4, seed=-1)
    with pytest.raises(TypeError, match="dims\\[1\\] must be an int"):
        sample_from_bases(sample_molrg(10, [2, 2], N=4).bases, dims=[2, 1.5], N=3)
    # numpy and one-element tensor integers are ints
    a = sample_molrg(10, [2, 1], N=np.int64(4), seed=torch.tensor(3))
    b = sample_molrg(10, [2, 1], N=4, seed=3)
    assert torch.equal(a.X, b.X)


def test_counts_set_the_mixture_that_fresh_samples_follow():
    """With counts and no pi, pi stayed uniform, and data.sample() drew a 50/50 reference set
    for a 25/75 training set. Now pi is the counts' proportions; an explicit pi is kept."""
    d = sample_molrg(8, [2, 2], counts=[10, 30], seed=0)
    torch.testing.assert_close(d.pi, torch.tensor([0.25, 0.75], dtype=torch.float64))
    _, lab = d.sample(N=8000, seed=5)
    assert abs((lab == 1).double().mean().item() - 0.75) < 0.02
    e = sample_molrg(8, [2, 2], counts=[10, 30], pi=[0.5, 0.5], seed=0)
    torch.testing.assert_close(e.pi, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.equal(e.X, d.X)  # pi does not change the counted draws


def test_fresh_samples_warn_on_the_training_seed():
    """sample()'s default seed 1 on data drawn with seed 1 repeated training samples (74 of 200):
    a reference set that is partly the training set. It warns now."""
    d = sample_molrg(8, [2, 2], N=200, seed=1, dtype=torch.float64)
    assert d.seed == 1
    with pytest.warns(UserWarning, match="MoLRGData.sample: seed 1 is the seed the training data"):
        R, _ = d.sample(N=200)
    assert (torch.cdist(R[0], d.X[0]).min(1).values == 0).sum() > 0  # the repeats it warns of
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R, _ = d.sample(N=200, seed=2)
    assert (torch.cdist(R[0], d.X[0]).min(1).values == 0).sum() == 0


def test_samples_that_overflow_the_dtype_are_refused():
    """noise_std = 1e300 in float32 returned +-inf samples, found later as "non-finite data"."""
    with pytest.raises(ValueError, match=r"sample_molrg: the samples overflow torch.float32 "
                                         r"\(noise_std"):
        sample_molrg(6, [6], N=5, noise_std=1e300)
    assert torch.isfinite(sample_molrg(6, [6], N=5, noise_std=1e300, dtype=torch.float64).X).all()
    with pytest.raises(ValueError, match="sample_from_bases: the samples overflow torch.float32"):
        sample_from_bases(torch.eye(4)[None, :, :2], N=3, noise_std=1e300)


def test_sampling_gathers_no_per_sample_basis(dispatched_ops):
    """Each sample's basis was gathered into a [P, N, n, dmax] float64 tensor (576 MB for the
    48 MB float32 training sets of the benchmark, P = 64, N = 4096, n = 48); the coefficients
    are scattered to their component instead ([P, N, K, dmax]). Samples lie in their subspace."""
    P, N, n, dims = 3, 50, 20, [4, 2, 3]
    calls = dispatched_ops(lambda: sample_molrg(n, dims, N=N, instances=P, seed=5,
                                                dtype=torch.float64))
    big = [name for name, args in calls for a in args
           if isinstance(a, torch.Tensor) and a.dim() == 4 and tuple(a.shape[:3]) == (P, N, n)]
    assert not big, big
    data = sample_molrg(n, dims, N=N, instances=P, seed=5, dtype=torch.float64)
    for p in range(P):
        for k, d in enumerate(dims):
            Xk = data.X[p][data.labels[p] == k]
            Uk = data.bases[p, k, :, :d]
            torch.testing.assert_close(Xk - Xk @ Uk @ Uk.T, torch.zeros_like(Xk), rtol=0,
                                       atol=1e-12)
