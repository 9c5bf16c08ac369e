"""Argument checks of the clustering baselines and the recovery / generation metrics (fuzz
findings 12-18 of session 28): every bad argument is a TypeError or ValueError naming the function
and the argument; huge labels and huge K no longer allocate by value."""
import numpy as np
import pytest
import torch

from molrg_ext.cluster import EnSC, KSubspaces, PCASubspace, match_dims, top_subspace
from molrg_ext.data import sample_molrg
from molrg_ext.metrics import (clustering_accuracy, copy_detection_score, gl_score,
                               max_cosine_similarity, nearest_neighbor_distances, nn_distance_sum,
                               recovery_success, subspace_distance)
from molrg_ext.metrics.recovery import projectors

pytestmark = pytest.mark.usefixtures("one_thread")


def X12():
    return sample_molrg(12, [2, 2], N=40, seed=0, dtype=torch.float64).X[0]


def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("call, err, msg", [
    (lambda X: top_subspace(None, 2, rng()), TypeError, "top_subspace: Xk must be a numeric"),
    (lambda X: top_subspace(np.ones(5), 2, rng()), ValueError, r"top_subspace: Xk must be \[N, n\]"),
    (lambda X: top_subspace(np.full((4, 3), np.nan), 2, rng()), ValueError,
     "top_subspace: Xk contains NaN or Inf"),
    (lambda X: top_subspace(X, "x", rng()), TypeError, "top_subspace: d must be an int, got 'x'"),
    (lambda X: top_subspace(X, -1, rng()), ValueError, "top_subspace: d must be >= 1, got -1"),
    (lambda X: top_subspace(X, 13, rng()), ValueError, "top_subspace: d = 13 must be <= n = 12"),
    (lambda X: top_subspace(X, 2, None), TypeError, "top_subspace: rng must be a numpy Generator"),
])
def test_top_subspace_checks_arguments(call, err, msg):
    X = X12().numpy()
    with pytest.raises(err, match=msg):
        call(X)
    # no rows at all is valid: random orthonormal directions
    B = top_subspace(np.zeros((0, 5)), 5, rng())
    np.testing.assert_allclose(B.T @ B, np.eye(5), atol=1e-12)


@pytest.mark.parametrize("labels, dims, err, msg", [
    (np.arange(40) % 5, [1, 2], ValueError, r"match_dims: labels must be in \[0, K\) = \[0, 2\)"),
    (-(np.arange(40) % 2), [1, 2], ValueError, r"labels must be in \[0, K\).*got -1"),
    (np.arange(10) % 2, [1, 2], ValueError, r"match_dims: labels must be \[N\] = \[40\]"),
    (np.arange(40) % 2 + 0.5, [1, 2], TypeError, "match_dims: labels must be integers, got dtype float64"),
    (np.arange(40) % 2, [-1, 2], ValueError, r"match_dims: dims\[0\] must be >= 1, got -1"),
    (np.arange(40) % 2, [1, 20], ValueError, r"match_dims: dims\[1\] = 20 must be <= n = 12"),
    (np.arange(40) % 3, [1, 2, 3.0], TypeError, r"match_dims: dims\[2\] must be an int"),
])
def test_match_dims_checks_arguments(labels, dims, err, msg):
    with pytest.raises(err, match=msg):
        match_dims(X12().numpy(), labels, dims)


def test_match_dims_checks_Xn():
    with pytest.raises(ValueError, match=r"match_dims: Xn must be \[N, n\]"):
        match_dims(np.float64(0.5), np.arange(40) % 2, [1, 2])


@pytest.mark.parametrize("U, dims, err, msg", [
    (None, [2, 3], TypeError, "projectors: U must be a torch.Tensor, got NoneType"),
    (torch.tensor(0.5), [2, 3], ValueError, r"projectors: U must be \[K, n, dmax\]"),
    (torch.randn(2, 8, 3), [2], ValueError, "projectors: dims must have K = 2 entries, got 1"),
    (torch.randn(2, 8, 3), [-1, 2], ValueError, r"projectors: dims\[0\] must be >= 1"),
    (torch.randn(2, 8, 3), [9, 9], ValueError, r"projectors: dims\[0\] = 9 must be <= dmax = 3"),
    (torch.randn(2, 8, 3), None, TypeError, "projectors: dims must be an int, got None"),
    (torch.ones(2, 8, 3, dtype=torch.bool), [2, 3], TypeError, "projectors: U must be real"),
    (torch.full((2, 8, 3), float("nan")), [2, 3], ValueError, "projectors: U contains NaN"),
])
def test_projectors_checks_arguments(U, dims, err, msg):
    with pytest.raises(err, match=msg):
        projectors(U, dims)


def test_clustering_accuracy_huge_label_values():
    """The confusion matrix was sized by the largest label (16 TiB for 2**40); now only the
    distinct values count, and the accuracy is the one of the relabelled problem."""
    assert clustering_accuracy([0, 2 ** 40], [0, 1]).item() == 1.0
    lab = torch.tensor([0, 0, 7, 7, 2 ** 40, 2 ** 40])
    pred = torch.tensor([2 ** 50, 2 ** 50, 0, 3, 3, 3])
    small = clustering_accuracy(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([2, 2, 0, 1, 1, 1]))
    assert clustering_accuracy(lab, pred).item() == small.item() == pytest.approx(5 / 6)
    batch = clustering_accuracy(torch.stack([lab, lab]), torch.stack([pred, lab]))
    assert batch.tolist() == [small.item(), 1.0]


@pytest.mark.parametrize("labels, pred, err, msg", [
    (None, [0, 1], TypeError, "clustering_accuracy: labels must be a tensor or array"),
    ([0, 1], "ab", TypeError, "clustering_accuracy: pred must be a tensor or array"),
    (torch.tensor([1j, 0]), [0, 1], TypeError,
     "clustering_accuracy: labels must be integers, got dtype torch.complex64"),
    ([0, 1], torch.tensor([True, False]), TypeError,
     "clustering_accuracy: pred must be integers, got dtype torch.bool"),
])
def test_clustering_accuracy_types(labels, pred, err, msg):
    with pytest.raises(err, match=msg):
        clustering_accuracy(labels, pred)


def test_recovery_success_checks_arguments():
    d = torch.tensor([0.1, 0.9], dtype=torch.float64)
    assert recovery_success(d, 2 ** 70).tolist() == [True, True]  # was OverflowError
    with pytest.raises(ValueError, match=r"recovery_success: threshold must be >= 0 \(not NaN\), "
                                         "got nan"):
        recovery_success(d, float("nan"))  # was all False
    with pytest.raises(ValueError, match="recovery_success: threshold must be >= 0"):
        recovery_success(d, -0.5)
    # 0 (exact recovery) and inf (always) stay valid, as they were before the checks
    assert recovery_success(torch.tensor([0.0, 0.1]), 0).tolist() == [True, False]
    assert recovery_success(d, float("inf")).tolist() == [True, True]
    assert recovery_success(d, torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist() == [False,
                                                                                       True]
    with pytest.raises(ValueError,
                       match=r"threshold of shape \(3,\) does not broadcast to dist's shape \(2,\)"):
        recovery_success(d, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(TypeError, match="recovery_success: threshold must be a number or a tensor, got str"):
        recovery_success(d, "x")
    with pytest.raises(TypeError, match="recovery_success: dist must be real, got dtype torch.complex64"):
        recovery_success(torch.tensor([0.1j]))
    with pytest.raises(TypeError, match="recovery_success: dist must be a tensor or array of numbers"):
        recovery_success(None)


def test_subspace_distance_norm_return_perm_and_dtype():
    U = torch.linalg.qr(torch.randn(2, 8, 2, dtype=torch.float64))[0]
    with pytest.raises(ValueError, match=r"subspace_distance: norm must be one of .*got \['fro'\]"):
        subspace_distance(U, U, norm=["fro"])
    with pytest.raises(TypeError, match="subspace_distance: return_perm must be a bool, got 'no'"):
        subspace_distance(U, U, return_perm="no")
    with pytest.raises(TypeError, match="subspace_distance: U_est must be real, got dtype torch.complex128"):
        subspace_distance(U.to(torch.complex128), U)


def test_huge_finite_data_is_refused_not_overflowed():
    """Entries of ~1e200 overflowed the squared norms: scipy's 'cost matrix is infeasible', an
    objective of inf, LinAlgError in subspace_distance, NaN scores."""
    X = X12()
    with pytest.raises(ValueError, match="KSubspaces: X is too large: its squared norm overflows"):
        KSubspaces(2, [1, 2], init="points").fit(X * 1e200)
    with pytest.raises(ValueError, match="KSubspaces.predict: X is too large"):
        KSubspaces(2, 2, n_init=1).fit(X).predict(X * 1e200)
    U = torch.linalg.qr(torch.randn(2, 8, 2, dtype=torch.float64))[0]
    with pytest.raises(ValueError, match="subspace_distance: U_est is too large: U U\\^T overflows"):
        subspace_distance(U * 1e200, U)
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="gl_score: x_gen is too large"):
        gl_score(x * 1e200, x)
    with pytest.raises(ValueError, match="nn_distance_sum: x is too large"):
        nn_distance_sum(x * 1e200)
    with pytest.raises(ValueError, match="nearest_neighbor_distances: y is too large"):
        nearest_neighbor_distances(x, x * 1e200)
    with pytest.raises(ValueError, match="max_cosine_similarity: x is too large"):
        max_cosine_similarity(x * 1e200, x)  # was similarity 0 for every row


@pytest.mark.parametrize("kw, err, msg", [
    (dict(x_gen="a"), TypeError, "copy_detection_score: x_gen must be a torch.Tensor, got str"),
    (dict(x_train="a"), TypeError, "copy_detection_score: x_train must be a torch.Tensor, got str"),
    (dict(threshold="x"), TypeError,
     "copy_detection_score: threshold must be a number or a tensor, got str"),
    (dict(threshold=None), TypeError, "copy_detection_score: threshold must be a number or a tensor"),
    (dict(threshold=torch.tensor([0.5, 0.5])), ValueError,
     r"copy_detection_score: threshold must be one number, got shape \(2,\)"),
    (dict(features="x"), TypeError, "copy_detection_score: features must be callable"),
    (dict(features=lambda z: z.tolist()), TypeError,
     r"copy_detection_score: features\(x_gen\) must be a torch.Tensor, got list"),
    (dict(x_gen=torch.randn(4, 2)), ValueError,
     "copy_detection_score: x_gen has 2 features but x_train has 3"),
])
def test_copy_detection_score_messages(kw, err, msg):
    args = dict(x_gen=torch.randn(4, 3), x_train=torch.randn(5, 3)) | kw
    with pytest.raises(err, match=msg):
        copy_detection_score(**args)


def test_gl_score_names_itself_for_chunk():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="gl_score: chunk must be >= 1, got 0"):
        gl_score(x, x + 1, chunk=0)


@pytest.mark.parametrize("make", [lambda K: KSubspaces(K, 2), lambda K: EnSC(K, 2)])
@pytest.mark.parametrize("K", [2 ** 40, 2 ** 70])
def test_huge_K_checked_against_N_before_dims(make, K):
    """dims_list built [d] * K first: MemoryError for 2**40, OverflowError for 2**70."""
    with pytest.raises(ValueError, match=f"K = {K} clusters but only N = 40 samples"):
        make(K).fit(X12())


@pytest.mark.parametrize("make, err, msg", [
    (lambda: KSubspaces(2, 2, seed=-1), ValueError, "KSubspaces: seed must be >= 0, got -1"),
    (lambda: KSubspaces(2, 2, seed="x"), TypeError, "KSubspaces: seed must be an int, got 'x'"),
    (lambda: KSubspaces(2, 2, seed=1.5), TypeError, "KSubspaces: seed must be an int, got 1.5"),
    (lambda: KSubspaces(2, 2, init="spectral", seed=2 ** 40), ValueError,
     r"KSubspaces: seed must be in \[0, 4294967296\), got 1099511627776"),
    (lambda: KSubspaces(2, 2, init="spectral", seed=np.random.default_rng(0)), TypeError,
     "KSubspaces: seed must be None, an int or a numpy RandomState for spectral clustering"),
    (lambda: EnSC(2, 2, seed=-1), ValueError, r"EnSC: seed must be in \[0, 4294967296\), got -1"),
    (lambda: EnSC(2, 2, seed=2 ** 64), ValueError, r"EnSC: seed must be in \[0, 4294967296\)"),
    (lambda: EnSC(2, 2, alpha=float("inf")), ValueError, "EnSC: alpha must be finite and > 0, got inf"),
    (lambda: EnSC(2, 2, alpha=True), TypeError, "EnSC: alpha must be a real number, got bool"),
    (lambda: EnSC(2, 2, l1_ratio="x"), TypeError, "EnSC: l1_ratio must be a real number, got str"),
    (lambda: EnSC(2, 2, l1_ratio=2), ValueError, r"EnSC: l1_ratio must be in \[0, 1\], got 2.0"),
    (lambda: PCASubspace(12), ValueError, "PCASubspace: d = 12 must be < n = 12"),
])
def test_estimator_parameter_messages(make, err, msg):
    with pytest.raises(err, match=msg):
        make().fit(X12()[:20])


def test_valid_seeds_still_accepted():
    """Big ints, numpy Generators and int lists still seed the non-spectral inits as before."""
    X = X12()
    for seed in (2 ** 70, [3, 1]):
        a = KSubspaces(2, 2, n_init=2, seed=seed).fit(X)
        b = KSubspaces(2, 2, n_init=2, seed=np.random.default_rng(seed)).fit(X)
        assert torch.equal(a.bases_, b.bases_)
    # SeedSequence and BitGenerator, which numpy's default_rng takes, as before the checks
    a = KSubspaces(2, 2, n_init=2, seed=7).fit(X)
    for seed in (np.random.SeedSequence(7), np.random.PCG64(7)):
        assert torch.equal(KSubspaces(2, 2, n_init=2, seed=seed).fit(X).bases_, a.bases_)
    with pytest.raises(TypeError, match="sklearn takes no SeedSequence"):
        KSubspaces(2, 2, init="spectral", seed=np.random.SeedSequence(7)).fit(X)
    with pytest.raises(TypeError, match="KSubspaces: seed must be an int, got True"):
        KSubspaces(2, 2, seed=True).fit(X)


def test_ragged_and_none_X_name_X():
    with pytest.raises(TypeError, match=r"KSubspaces: X must be a numeric \[N, n\] array"):
        KSubspaces(2, 2).fit([[1.0, 2.0], [3.0]])  # was a raw 'setting an array element' error
    with pytest.raises(TypeError, match="EnSC: X must be a numeric"):
        EnSC(2, 2).fit(None)
