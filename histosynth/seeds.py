"""Seeds: every stage derives its own from the master seed (config `seed`) and names, so runs are
deterministic and independent of process and order."""

from __future__ import annotations

import random
import zlib

import numpy as np


def derive_seed(master: int, *names: object) -> int:
    """A stable 31-bit seed for one unit of work (e.g. a slide), derived from the master seed and
    its names; unlike hash(), it does not change between Python processes."""
    key = ":".join([str(master), *map(str, names)]).encode()
    return zlib.crc32(key) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a deterministic run."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
