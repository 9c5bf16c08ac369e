"""GL score nearest neighbours: chunked float64 search (molrg_ext) vs scikit-learn's NearestNeighbors.

Run: PYTHONPATH=. python -m pytest benchmarks/bench_generation_metrics.py --benchmark-only
"""
import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from molrg_ext.metrics import nearest_neighbor_distances

N, n = 4000, 48


@pytest.fixture(scope="module")
def x():
    return torch.randn(N, n, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("chunk", [256, 1024])
def test_chunked_nn(benchmark, x, chunk):
    d = benchmark(nearest_neighbor_distances, x, None, chunk)
    assert d.shape == (N,)


def test_sklearn_nn(benchmark, x):
    xn = x.double().numpy()

    def run():
        nn_ = NearestNeighbors(n_neighbors=2).fit(xn)
        return nn_.kneighbors(xn)[0][:, 1]

    d = benchmark(run)
    np.testing.assert_allclose(d, nearest_neighbor_distances(x).numpy(), rtol=1e-6)
