"""Run under torchrun with 2 processes: the re-initialised student is identical on every rank,
and the check notices when it is not."""

import dataclasses
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from helpers import tiny_config  # noqa: E402

from dbot_ds.runtime.distributed import world_from_env  # noqa: E402
from dbot_ds.runtime.engine import init_distributed, replicas_identical, shutdown_distributed  # noqa: E402
from dbot_ds.method.stages import fresh_student  # noqa: E402

world = world_from_env()
assert world.size == 2, world
init_distributed(world)
cfg = tiny_config()
assert replicas_identical(fresh_student(cfg, 2, 32)), "same seed, different students"
rank_seeded = dataclasses.replace(cfg, seed=world.rank)  # the authors' bug: a per-rank RNG
assert not replicas_identical(fresh_student(rank_seeded, 2, 32)), "the check missed a divergence"
print(f"rank {world.rank}: replicas check OK")
shutdown_distributed()
