"""Odd arguments of the data samplers, the Gaussian and optimal denoisers and camera_patches (found
by fuzzing): each is an error naming the function and the argument, nothing silently wrong."""
import math

import numpy as np
import pytest
import torch

from molrg_ext.data import MoLRGData, sample_from_bases, sample_molrg
from molrg_ext.datasets_offline import CAMERA_IMAGES, camera_patches
from molrg_ext.gaussian_denoiser import GaussianDenoiser
from molrg_ext.hidden_gaussian import OptimalDenoiser, optimal_denoiser


def gauss(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64)
    X = X @ torch.diag(torch.tensor([3.0, 2, 1, 0.5, 0, 0], dtype=torch.float64))
    return GaussianDenoiser.fit(X.to(dtype)), X.to(dtype)


# ----------------------------------------------------------------------------- GaussianDenoiser
def test_gaussian_init_refuses_non_finite_mu_and_U_and_bad_sample_shape():
    G, _ = gauss()
    mu, U, lam = G.mu.clone(), G.U.clone(), G.lam.clone()
    with pytest.raises(ValueError, match="^GaussianDenoiser: mu contains NaN or Inf"):
        GaussianDenoiser(torch.full_like(mu, float("nan")), U, lam)
    U_inf = U.clone()
    U_inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match="^GaussianDenoiser: U contains NaN or Inf"):
        GaussianDenoiser(mu, U_inf, lam)
    for shape, err, match in (((5,), ValueError, r"sample_shape \(5,\) must hold n = 6 entries"),
                              ((-2, -3), ValueError, r"sample_shape\[0\] must be >= 1"),
                              ("abc", TypeError, "sample_shape must be a sequence of ints"),
                              (6, TypeError, "sample_shape must be a sequence of ints"),
                              ((2.0, 3), TypeError, r"sample_shape\[0\] must be an int")):
        with pytest.raises(err, match="^GaussianDenoiser: " + match):
            GaussianDenoiser(mu, U, lam, shape)
    assert GaussianDenoiser(mu, U, lam, torch.Size([2, 3])).sample_shape == (2, 3)


def test_gaussian_trajectory_sigma_T_out_of_range_is_an_error():
    G, X = gauss()
    x = X[:5] * 3
    # 1e-200 squared underflowed to 0 (NaN and Inf out), 1e200 and 2**70 squared overflowed
    for T in (1e-200, 1e200, 2**70 * 2**500, 1e-155):
        with pytest.raises(ValueError, match=r"^GaussianDenoiser.trajectory: sigma_T must be in "
                                             r"\[1.492e-154, 1.341e\+154\] for torch.float64"):
            G.trajectory(x, T, [1.0, 0.0])
    G32, X32 = gauss(torch.float32)
    with pytest.raises(ValueError, match=r"sigma_T must be in \[1.084e-19, 1.845e\+19\] for "
                                         r"torch.float32"):
        G32.trajectory(X32[:5], 2**70, [0.0])
    for T in (True, "3", torch.tensor(3.0)):
        with pytest.raises(TypeError, match="^GaussianDenoiser.trajectory: sigma_T must be a "
                                            "number"):
            G.trajectory(x, T, [0.0])
    # in range, also far out, the closed form: x(sigma) = mu + U diag(sqrt((lam + sigma^2) /
    # (lam + T^2))) U^T (x_T - mu); an int sigma_T whose square is beyond int64 works as a float
    z = (x - G.mu) @ G.U
    for T, sig in ((2**70, 3.0), (1e-150, 2.0), (1e150, 1e150)):
        ratio = torch.sqrt((G.lam + sig**2) / (G.lam + float(T) ** 2))
        want = G.mu + (z * ratio) @ G.U.T
        torch.testing.assert_close(G.trajectory(x, T, [sig])[0], want, rtol=1e-12, atol=0)
    assert torch.isfinite(G.trajectory(x, 1e-150, [2.0])).all()


def test_gaussian_trajectory_sigmas_checked():
    G, X = gauss()
    x = X[:5]
    with pytest.raises(ValueError, match=r"^GaussianDenoiser.trajectory: sigmas must be in "
                                         r"\[0, 1.341e\+154\] for torch.float64"):
        G.trajectory(x, 3.0, [1e200])
    # sigma / sigma_T beyond 1e154: the scale of the ODE solution overflows
    with pytest.raises(ValueError, match="sigmas up to 1e\\+150 are too large for sigma_T = "
                                         "1e-150"):
        G.trajectory(x, 1e-150, [1e150, 0.0])
    for bad in ([1 + 1j], torch.tensor([0.5 + 0.5j]), torch.tensor([True]), "1.0"):
        with pytest.raises(TypeError, match="^GaussianDenoiser.trajectory: sigmas must hold real "
                                            "numbers"):
            G.trajectory(x, 3.0, bad)
    with pytest.raises(ValueError, match="^GaussianDenoiser.trajectory: sigmas must be a "
                                         "rectangular sequence of real numbers"):
        G.trajectory(x, 3.0, [[1.0], [0.5, 0.0]])


def test_gaussian_sigma_complex_bool_and_matrix_sigma():
    G, X = gauss()
    for bad in (torch.tensor([0.5 + 1j]), torch.tensor(True)):
        with pytest.raises(TypeError, match="^GaussianDenoiser: sigma must be a real"):
            G(X[:5], bad)
    with pytest.raises(TypeError, match="^GaussianDenoiser: sigma must be a number or a tensor, "
                                        "got bool"):
        G(X[:5], True)
    where = "^GaussianDenoiser.matrix: sigma must be "
    for bad, err, match in (("0.5", TypeError, "a real number, got str"),
                            (None, TypeError, "a real number, got NoneType"),
                            (True, TypeError, "a real number, got bool"),
                            (torch.tensor([0.5, 1.0]), ValueError, r"one number, got a tensor "
                                                                   r"of shape \(2,\)"),
                            (torch.tensor(0.5 + 1j), TypeError, "a real"),
                            (-1.0, ValueError, "finite and >= 0")):
        with pytest.raises(err, match=where + match):
            G.matrix(bad)
    W, b = G.matrix(np.float32(0.5))
    W2, b2 = G.matrix(torch.tensor([0.5], dtype=torch.float32))
    torch.testing.assert_close((W, b), (W2, b2), rtol=0, atol=0)
    torch.testing.assert_close(X[:5] @ W.T + b, G(X[:5], 0.5))


# ------------------------------------------------------------------------ optimal denoiser args
def test_optimal_denoiser_module_checks_its_arguments():
    X = torch.randn(10, 4, dtype=torch.float64)
    for block, err, match in (("8", TypeError, "block must be an int"),
                              (1.5, TypeError, "block must be an int"),
                              (True, TypeError, "block must be an int"),
                              (0, ValueError, r"block must be in \[1, "),
                              (2**63, ValueError, r"block must be in \[1, 9223372036854775808\)")):
        with pytest.raises(err, match="^OptimalDenoiser: " + match):
            OptimalDenoiser(X, block=block)
        with pytest.raises(err, match="^optimal_denoiser: " + match):
            optimal_denoiser(X[:2], X, 1.0, block=block)
    for s, err, match in (("2", TypeError, "s must be a real number, got str"),
                          (None, TypeError, "s must be a real number, got NoneType"),
                          (True, TypeError, "s must be a real number, got bool"),
                          (float("nan"), ValueError, "s must be finite and > 0, got nan"),
                          (0.0, ValueError, "s must be finite and > 0"),
                          (math.inf, ValueError, "s must be finite and > 0")):
        with pytest.raises(err, match="^OptimalDenoiser: " + match):
            OptimalDenoiser(X, s=s)
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="^OptimalDenoiser: X_train contains NaN or Inf"):
        OptimalDenoiser(bad)
    with pytest.raises(TypeError, match="^OptimalDenoiser: X_train must be float32 or float64, "
                                        "got torch.int64"):
        OptimalDenoiser(torch.ones(10, 4, dtype=torch.int64))
    D = OptimalDenoiser(X, s=np.float64(1.0), block=np.int64(4))
    assert (D.s, D.block) == (1.0, 4)
    torch.testing.assert_close(D(X[:2] + 0.1, 0.5), optimal_denoiser(X[:2] + 0.1, X, 0.5))


def test_optimal_denoiser_refuses_complex_and_bool_sigma():
    X = torch.randn(10, 4, dtype=torch.float64)
    for name, kw in (("sigma", dict(sigma=torch.tensor([0.5 + 1j]))),
                     ("sigma", dict(sigma=torch.tensor(True))),
                     ("s", dict(sigma=0.5, s=torch.tensor(1.0 + 0j))),
                     ("sigma", dict(sigma=True))):
        with pytest.raises(TypeError, match=f"^optimal_denoiser: {name} must be a"):
            optimal_denoiser(X[:2], X, **kw)


# --------------------------------------------------------------------------------------- data
def test_sample_from_bases_checks_dtype_and_bases():
    bases = sample_molrg(6, [2, 2], N=4, dtype=torch.float64).bases
    for dtype in (torch.int64, torch.bool, 1.5, "float32", torch.float16):
        with pytest.raises(TypeError, match="^sample_from_bases: dtype must be float32 or "
                                            "float64"):
            sample_from_bases(bases, N=3, dtype=dtype)
    for b in (bases.to(torch.int64), bases.to(torch.complex128), bases.bool()):
        with pytest.raises(TypeError, match="^sample_from_bases: bases must be a real floating "
                                            "tensor"):
            sample_from_bases(b, N=3)
    with pytest.raises(ValueError, match=r"^sample_from_bases: bases must have n >= 1 rows, got "
                                         r"shape \(1, 2, 0, 2\)"):
        sample_from_bases(bases[:, :, :0], N=3)
    X, _ = sample_from_bases(bases, N=3, dtype=torch.float32, seed=5)
    X64, _ = sample_from_bases(bases, N=3, seed=5)
    assert X.dtype == torch.float32 and X64.dtype == torch.float64
    torch.testing.assert_close(X, X64.float())


def test_sample_molrg_huge_sizes_and_seeds_name_the_argument():
    where = "^sample_molrg: "
    for kw, match in ((dict(seed=2**64), r"seed must be in \[0, 18446744073709551616\)"),
                      (dict(N=2**70), r"N must be in \[1, 9223372036854775808\)"),
                      (dict(n=2**70), r"n must be in \[1, 9223372036854775808\)"),
                      (dict(instances=2**63), r"instances must be in \[1, 9223372036854775808\)"),
                      (dict(dims=2, K=2**40), "orthogonal bases need K = 1099511627776 <= n = 8"),
                      (dict(dims=2, K=9), "orthogonal bases need K = 9 <= n = 8"),
                      (dict(N=None, counts=[2**62, 2**62]), r"counts must be >= 0 with a total "
                                                            r"in \[1, 2\*\*63\)")):
        args = dict(n=8, dims=[2, 3], N=10)
        args.update(kw)
        with pytest.raises(ValueError, match=where + match):
            sample_molrg(**args)
    with pytest.raises(ValueError,
                       match=r"^sample_from_bases: seed must be in \[0, 18446744073709551616\)"):
        sample_from_bases(sample_molrg(8, [2], N=3).bases, N=3, seed=2**64)
    # the largest seed torch.Generator takes still works, and a seed gives the same data
    a = sample_molrg(8, [2, 3], N=10, seed=2**64 - 1)
    torch.testing.assert_close(a.X, sample_molrg(8, [2, 3], N=10, seed=2**64 - 1).X)


def test_noise_std_and_pi_are_checked_by_name():
    for where, f in (("sample_molrg", lambda **kw: sample_molrg(8, [2, 3], N=5, **kw)),
                     ("sample_from_bases",
                      lambda **kw: sample_from_bases(sample_molrg(8, [2, 3], N=5).bases, N=5,
                                                     **kw))):
        for v, err, match in (("x", TypeError, "noise_std must be a real number, got str"),
                              ("0.1", TypeError, "noise_std must be a real number, got str"),
                              (None, TypeError, "noise_std must be a real number, got NoneType"),
                              (True, TypeError, "noise_std must be a real number, got bool"),
                              (torch.tensor([0.1, 0.2]), ValueError, "noise_std must be one "
                                                                     "number"),
                              (torch.tensor(0.1 + 1j), TypeError, "noise_std must be a real")):
            with pytest.raises(err, match=f"^{where}: {match}"):
                f(noise_std=v)
        for pi in ("x", [1 + 1j, 1]):
            with pytest.raises(TypeError, match=f"^{where}: pi must hold real numbers"):
                f(pi=pi)
    a = sample_molrg(8, [2, 3], N=5, noise_std=np.float32(0.25), seed=2)
    b = sample_molrg(8, [2, 3], N=5, noise_std=torch.tensor(0.25), seed=2)
    torch.testing.assert_close(a.X, b.X, rtol=0, atol=0)
    assert a.noise_std == 0.25


def test_molrg_counts_refuses_labels_out_of_range():
    d = sample_molrg(8, [2, 3], counts=[2, 3], seed=0)
    bad = MoLRGData(d.X, d.labels + 1, d.bases, d.dims, d.pi)
    with pytest.raises(ValueError, match=r"^MoLRGData.counts: labels must be in \[0, K = 2\), "
                                         r"got values in \[1, 2\]"):
        bad.counts()
    with pytest.raises(TypeError, match="^MoLRGData.counts: labels must be int64, got "
                                        "torch.float32"):
        MoLRGData(d.X, d.labels.float(), d.bases, d.dims, d.pi).counts()
    assert d.counts().tolist() == [[2, 3]]


# -------------------------------------------------------------------------------- camera_patches
def test_camera_patches_takes_only_2d_grey_or_colour_images():
    pytest.importorskip("skimage")  # the images extra
    for name in ("lfw_subset", "stereo_motorcycle", "file_hash", "download_all", "brain",
                 "lbp_frontal_face_cascade_filename", "cells3d", "load", "CAMERA", "_fetch"):
        with pytest.raises(ValueError, match=f"^camera_patches: scikit-image has no sample image "
                                             f"'{name}' of those this takes .*one of astronaut, "
                                             f"binary_blobs, "):
            camera_patches(3, image=name)
    with pytest.raises(TypeError, match="^camera_patches: image must be a str, got int"):
        camera_patches(3, image=5)
    # every allowed image loads offline and gives grey patches in [-1, 1]
    for name in CAMERA_IMAGES:
        p = camera_patches(2, size=4, image=name)
        assert p.shape == (2, 1, 4, 4) and p.min() >= -1 and p.max() <= 1, name


def test_camera_patches_without_scikit_image_names_the_extra(monkeypatch):
    import sys

    from molrg_ext.datasets_offline import camera_patches
    for name in ("skimage", "skimage.data", "skimage.color"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"camera_patches needs scikit-image.*'images' extra"):
        camera_patches(3)
