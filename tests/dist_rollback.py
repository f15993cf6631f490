"""Run under torchrun with 2 processes: rank 1's loss alone turns NaN for one micro-batch; both
ranks see the divergence (the window's loss is reduced), go back to the same checkpoint and
finish together. Argument: the run directory."""

import sys

from helpers import PoisonedFrom, tiny_config

from dbot_ds.commands.pretrain import pretraining
from dbot_ds.runtime.engine import shutdown_distributed
from dbot_ds.weights.rundir import RunDir


cfg = tiny_config("stages.epochs=[3]", "checkpoint.every_steps=2", "divergence.policy=rollback",
                  "batch.global_batch=16", "batch.micro_batch=4")  # 2 ranks: 2 micro-batches a step
with pretraining(cfg, RunDir(sys.argv[1])) as job:
    task, engine = job.start(1)
    trainer = job.trainer(PoisonedFrom(task, 10, here=job.session.world.rank == 1), engine, 1)
    resumed, resume = [], trainer.resume
    trainer.resume = lambda ckpt: (resumed.append(ckpt.name), resume(ckpt))[1]  # where each rank goes back to
    outcome = trainer.fit()
    engine.destroy()
print(f"rank {job.session.world.rank}: finished={outcome.finished} step={outcome.step} "
      f"rollbacks={trainer.rollbacks} data_skip={trainer.data_skip} back_to={','.join(resumed)}")
shutdown_distributed()
