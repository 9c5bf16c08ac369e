"""``molrg bench``: time the fused ops against eager PyTorch and torch.compile (table + JSON)."""
from __future__ import annotations

import argparse

from .._args import MODES
from ..bench import _shapes, add_arguments as _add, run_args
from ._common import INDEX_MAX, out_file, threads_int


def _modes(text: str) -> str:
    """argparse type of --modes: a comma list of denoiser modes, checked before anything is timed
    (kept as the text the runner splits)."""
    bad = [m for m in text.split(",") if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"must be a comma list of {' / '.join(sorted(MODES))}, "
                                         f"got {text!r}")
    return text


def _sized_shapes(text: str) -> list:
    """The runner's --shapes type, with each size at most 2**31 - 1 (the ops index with int32)."""
    shapes = _shapes(text)
    for sh in shapes:
        if max(sh) > INDEX_MAX:
            raise argparse.ArgumentTypeError(f"shape {','.join(map(str, sh))!r} has a size "
                                             f"above {INDEX_MAX}")
    return shapes


def add_arguments(parser):
    _add(parser)
    # the runner's parser (shared with python -m benchmarks) gets the checks the other commands
    # make at parse time: --out a file path, not a folder; bounded --threads and sizes
    for option, type_ in (("--out", out_file), ("--threads", threads_int), ("--modes", _modes),
                          ("--shapes", _sized_shapes)):
        parser._option_string_actions[option].type = type_
    parser._option_string_actions["--threads"].help += " (at most 4096)"


def run(args):
    return run_args(args)
