"""Device, precision and seeding helpers shared by every stage."""

from __future__ import annotations

import zlib


def derive_seed(master: int, *names: object) -> int:
    """A stable 31-bit seed for one unit of work (e.g. a slide), derived from the master seed and
    its names; unlike hash(), it does not change between Python processes."""
    key = ":".join([str(master), *map(str, names)]).encode()
    return zlib.crc32(key) & 0x7FFFFFFF
