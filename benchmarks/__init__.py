"""pytest-benchmark suites of molrg_ext; ``python -m benchmarks`` prints a comparison table."""
