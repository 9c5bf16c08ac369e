"""Helpers shared by the network experiments (rank-vs-snr, gl-score, edit)."""
from __future__ import annotations

import json
import os
import numpy as np
import torch

__all__ = ["write_json", "read_json", "seed_everything"]


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    return torch.Generator().manual_seed(int(seed))


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
