"""Shared options of the benchmark suites (run with ``pytest benchmarks/ --benchmark-only``).

Each case is built by ``molrg_ext.bench`` so the suites time exactly what ``python -m benchmarks``
times. ``--bench-full`` adds the large issue-4 shapes (a few minutes on 2 cores)."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", help="include the large shapes")


@pytest.fixture
def full(request):
    return request.config.getoption("--bench-full")


@pytest.fixture
def run_case(benchmark):
    """run_case(fn, rounds): time fn with pytest-benchmark; skip when fn is None (unavailable)."""

    def run(fn, rounds=5):
        if fn is None:
            pytest.skip("implementation not available here")
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)

    return run
