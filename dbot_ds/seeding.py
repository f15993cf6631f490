"""Seeds derived from names and counters: every random choice of a run is a function of the
run seed and its position, so resumed runs replay exactly and ranks agree where they must."""

import hashlib


def derive_seed(seed: int, *keys) -> int:
    text = ":".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
