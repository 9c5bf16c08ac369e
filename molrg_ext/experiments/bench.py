"""``molrg bench``: time the fused ops against eager PyTorch and torch.compile (table + JSON)."""
from __future__ import annotations

from ..bench import add_arguments as _add, run_args


def add_arguments(parser):
    _add(parser)


def run(args):
    return run_args(args)
