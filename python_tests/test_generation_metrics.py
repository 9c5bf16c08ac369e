"""GL score (21) and the copy-detection score."""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.metrics.pairwise import cosine_similarity

from molrg_ext.data import sample_molrg
from molrg_ext.metrics import (copy_detection_score, gl_score, max_cosine_similarity,
                               nearest_neighbor_distances, nn_distance_sum)


def test_nearest_neighbours_match_scipy_in_small_chunks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=g)
    y = torch.randn(23, 5, generator=g)
    D = cdist(x.double().numpy(), y.double().numpy())
    np.testing.assert_allclose(nearest_neighbor_distances(x, y, chunk=4).numpy(), D.min(1), rtol=1e-9)
    Dx = cdist(x.double().numpy(), x.double().numpy())
    np.fill_diagonal(Dx, np.inf)
    np.testing.assert_allclose(nearest_neighbor_distances(x, chunk=5).numpy(), Dx.min(1), rtol=1e-9)
    assert nn_distance_sum(x, chunk=3) == pytest.approx(Dx.min(1).sum(), rel=1e-9)


def test_distances_and_gl_score_do_not_depend_on_a_common_offset():
    """|x|^2 + |y|^2 - 2 x.y in float64 lost every digit at an offset of 1e8: all distances 0 and
    a GL score of 0.0 (or 0.5, or "all reference samples coincide"), where the true one is 0.99."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 16, dtype=torch.float64, generator=g)
    y = torch.randn(200, 16, dtype=torch.float64, generator=g)
    Dx = cdist(x.numpy(), x.numpy())
    np.fill_diagonal(Dx, np.inf)
    for offset in (1e4, 1e8, 1e12):
        np.testing.assert_allclose(nearest_neighbor_distances(x + offset, chunk=64).numpy(),
                                   Dx.min(1), rtol=1e-3 if offset > 1e10 else 1e-6)
        np.testing.assert_allclose(nearest_neighbor_distances(x + offset, y + offset).numpy(),
                                   cdist(x.numpy(), y.numpy()).min(1),
                                   rtol=1e-3 if offset > 1e10 else 1e-6)
        assert gl_score(x + offset, y + offset) == pytest.approx(gl_score(x, y), rel=1e-3)
    assert gl_score(x, y) == pytest.approx(0.9906, abs=1e-4)


def test_duplicates_have_zero_self_distance():
    x = torch.randn(10, 4, dtype=torch.float64)
    xx = torch.cat([x, x])
    assert nearest_neighbor_distances(xx, chunk=3).max() < 1e-6


def test_gl_score_fresh_samples_near_one_copies_near_zero():
    n, dims, N = 48, [4, 4], 600
    data = sample_molrg(n, dims, N=40, seed=1)
    train = data.X[0]
    ref, fresh = data.sample(N, seed=2)[0][0], data.sample(N, seed=3)[0][0]
    assert gl_score(fresh, ref, chunk=128) == pytest.approx(1.0, abs=0.1)
    # a memorising generator: N outputs drawn from 40 training points (with tiny jitter)
    idx = torch.randint(0, 40, (N,), generator=torch.Generator().manual_seed(4))
    copies = train[idx] + 1e-3 * torch.randn(N, n, generator=torch.Generator().manual_seed(5))
    assert gl_score(copies, ref, chunk=128) < 0.05
    # samples off the subspaces (isotropic noise in 48 dims) spread more than the data
    iso = torch.randn(N, n, generator=torch.Generator().manual_seed(6))
    assert gl_score(iso, ref) > 1.5


def test_copy_detection_matches_sklearn_and_features():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(30, 16, generator=g)
    gen = torch.cat([train[:10] + 0.05 * torch.randn(10, 16, generator=g), torch.randn(20, 16, generator=g)])
    sim = max_cosine_similarity(gen, train, chunk=7).numpy()
    np.testing.assert_allclose(sim, cosine_similarity(gen.numpy(), train.numpy()).max(1), rtol=1e-5, atol=1e-6)
    assert copy_detection_score(gen, train, threshold=0.9) == pytest.approx(10 / 30)
    assert copy_detection_score(gen, train, threshold=0.6, chunk=4) == pytest.approx(float((sim > 0.6).mean()))
    # a feature map that ignores the differing coordinates makes every sample a copy
    assert copy_detection_score(gen, train, threshold=0.99, features=lambda v: v.abs()[:, :1] + 1) == 1.0


def test_metric_bad_inputs():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="features"):
        gl_score(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="NaN"):
        gl_score(torch.full((5, 3), float("nan")), x)
    with pytest.raises(ValueError, match="empty"):
        nearest_neighbor_distances(x[:0])
    with pytest.raises(ValueError, match="at least 2"):
        nearest_neighbor_distances(x[:1])
    with pytest.raises(ValueError, match="chunk"):
        nearest_neighbor_distances(x, chunk=0)
    with pytest.raises(ValueError, match="threshold"):
        copy_detection_score(x, x, threshold=2.0)
    with pytest.raises(ValueError, match="D = 0"):
        gl_score(x, torch.zeros(5, 3))
    with pytest.raises(TypeError, match="floating"):
        gl_score(torch.ones(5, 3, dtype=torch.int64), x)
    # D grows with N: unequal counts scored 6.25 for one distribution (1000 against 100)
    with pytest.raises(ValueError, match="x_gen has 10 samples but x_ref has 5"):
        gl_score(torch.randn(10, 3), x)
    with pytest.raises(TypeError, match="chunk must be an int"):
        nearest_neighbor_distances(x, chunk=2.5)
