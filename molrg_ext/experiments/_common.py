"""Helpers shared by the experiment commands: seeding, atomic JSON files, the settings check that
keeps a rerun from mixing its results with an earlier run's, and argparse value types."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import threading
import warnings

import numpy as np
import torch

__all__ = ["write_json", "read_json", "seed_everything", "check_settings", "int_at_least",
           "finite_float", "int_list", "out_dir", "out_file", "seed_int", "threads_int",
           "width_int", "INDEX_MAX", "FLOAT32_MAX"]

# upper bounds of the option types: far above any experiment, below what overflows
INDEX_MAX = 2**31 - 1  # sizes and counts (tensor dimensions; the ops index with int32)
WIDTH_MAX = 2**20  # network widths: a layer holds width**2 weights, which must not overflow
THREADS_MAX = 4096
SEED_MAX = 2**32 - 1  # numpy's seed range; keeps derived seeds (seed * 1_000_003 + ...) in int64
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the networks and trainers compute in float32


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    return torch.Generator().manual_seed(int(seed))


def subplots(*args, figsize=None, **kwargs):
    """``(figure, axes)`` as ``pyplot.subplots(*args, figsize=figsize, **kwargs)`` returns them,
    on a matplotlib Figure made without pyplot: the caller's backend, pyplot's list of figures
    and any GUI are left alone (pyplot is not thread-safe, and switching to the Agg backend, as
    the plots did before, switched it for the whole process, a notebook's too); the figure
    renders to files with ``savefig`` and is freed with its last reference."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


_INIT_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded_init(seed: int):
    """torch's default CPU generator seeded with ``seed`` while a network is built on the CPU
    (nn.Module constructors draw their initial weights from it and take no generator), and its
    state before the block put back afterwards; accelerator generators are not touched. The lock
    keeps this package's seeded initialisations in different threads apart (torch.manual_seed
    replaced the caller's RNG state, and threads doing it at once got each other's weights); CPU
    draws that other code makes from the default generator meanwhile are not kept apart."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        yield


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str):
    """The JSON in ``path``, or None when there is none. A file that does not parse (written by
    hand or by another program; this package writes atomically) is moved aside to
    ``path + ".corrupt"`` with a warning naming it, and None is returned: the run then recomputes
    what the file held instead of stopping."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        os.replace(path, path + ".corrupt")
        warnings.warn(f"{path} is not valid JSON ({e}); moved to {path}.corrupt, recomputing",
                      RuntimeWarning, stacklevel=2)
        return None


def _plain(obj):
    """obj as JSON would give it back (tuples become lists), for comparisons with saved data."""
    return json.loads(json.dumps(obj))


def check_settings(out: str, where: str, settings: dict, fresh: bool = False,
                   owned: tuple = (), saved: dict | None = None) -> None:
    """Refuse to reuse ``out`` for other settings.

    ``settings`` are the values that determine the results and checkpoints cached in ``out``
    (seed, model, data and training settings; not the list of things to compute, which a rerun may
    extend). They are kept in ``out/<where>.settings.json`` (one file per command, so commands
    sharing an ``out`` never compare each other's); a rerun whose settings differ raises a
    ValueError naming each difference (the CLI reports it as a usage error), since mixing the
    two runs' results or resuming a network trained with other settings would be silently wrong.
    ``fresh``: delete what the command keeps in ``out`` first (``owned``: its result files and
    checkpoint folders, names relative to ``out``, none shared with another command; nothing
    else there) and start over. ``saved``: the settings an older version recorded elsewhere
    (used when there is no settings file; ``{}`` refuses any settings)."""
    settings_name = f"{where}.settings.json"
    path = os.path.join(out, settings_name)
    if fresh:
        saved = None
        for name in (*owned, settings_name):
            p = os.path.join(out, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    os.makedirs(out, exist_ok=True)
    new = _plain({"command": where, **settings})
    old = read_json(path)
    if old is None and saved is not None:
        old = _plain({"command": where, **saved})
    if old is not None and old != new:
        keys = sorted(set(old) | set(new))
        diff = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
                         if old.get(k) != new.get(k))
        raise ValueError(f"{where}: {out} holds results of other settings ({diff}); pass another "
                         "--out, or --fresh to delete them and start over")
    write_json(path, new)


def int_at_least(lo: int, hi: int = INDEX_MAX):
    """argparse type: an int in [lo, hi] (the error names the option, exit status 2)."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {lo}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an int >= {lo}, got {v}")
        if v > hi:
            raise argparse.ArgumentTypeError(f"must be an int in [{lo}, {hi}], got {v}")
        return v
    parse.__name__ = f"int in [{lo}, {hi}]"
    return parse


seed_int = int_at_least(0, SEED_MAX)
threads_int = int_at_least(1, THREADS_MAX)
width_int = int_at_least(1, WIDTH_MAX)


def finite_float(lo: float = -math.inf, lo_open: bool = False, hi: float = math.inf):
    """argparse type: a finite float >= lo (> lo when lo_open) and <= hi."""
    what = "a finite number" + ("" if lo == -math.inf else f" {'>' if lo_open else '>='} {lo:g}")
    what += "" if hi == math.inf else f"{' and' if lo > -math.inf else ''} <= {hi:g}"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        return v
    parse.__name__ = what
    return parse


def int_list(lo: int = 1, hi: int = INDEX_MAX):
    """argparse type: a non-empty comma list of ints in [lo, hi] ("8,32,128"; empty items
    between commas are skipped, but a list with no int at all is an error)."""
    one = int_at_least(lo, hi)

    def parse(s: str) -> list:
        items = [v for v in s.split(",") if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be a comma list of ints >= {lo}, got {s!r}")
        return [one(v) for v in items]
    parse.__name__ = "comma list of ints"
    return parse


def _not_a_folder(path: str):
    """The first of ``path`` and the folders above it that exists but is not a folder (a file,
    or a link to nothing), or None."""
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    return None if os.path.isdir(p) else p


def out_dir(convert=str):
    """argparse type of an --out folder (made by the command): refused when it or a folder above
    it exists as something else, instead of a traceback from makedirs once the run starts.
    ``convert``: what the command takes (str or pathlib.Path)."""
    def parse(s: str):
        if not s:
            raise argparse.ArgumentTypeError("must be a folder path, got ''")
        bad = _not_a_folder(s)
        if bad is not None:
            raise argparse.ArgumentTypeError(f"must be a folder, but {bad} exists and is not one, "
                                             f"got {s!r}")
        return convert(s)
    parse.__name__ = "folder"
    return parse


def out_file(s: str) -> str:
    """argparse type of an --out file path: not an existing folder, and every folder above it that
    exists a folder. "" is kept (the caller's "write no file")."""
    if s:
        bad = _not_a_folder(os.path.dirname(os.path.abspath(s)))
        if os.path.isdir(s):
            raise argparse.ArgumentTypeError(f"must be a file path, but {s!r} is a folder")
        if bad is not None:
            raise argparse.ArgumentTypeError(f"must be a file path, but {bad} exists and is not a "
                                             f"folder, got {s!r}")
    return s
