"""``molrg bench``: time the fused ops against eager PyTorch and torch.compile (table + JSON).
Its options, with their parse-time checks, are the runner's (molrg_ext.bench.add_arguments), so
``python -m benchmarks`` checks them the same way."""
from __future__ import annotations

from ..bench import add_arguments, run_args  # noqa: F401  (add_arguments: the CLI reads it here)


def run(args):
    return run_args(args)
