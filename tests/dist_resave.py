"""Resume a run's newest checkpoint on however many ranks this runs with (torchrun, or one
process) and save it again at the same step into OUT: what an elastic resume starts from."""

import json
from pathlib import Path
import sys

from dbot_ds.commands.pretrain import pretraining
from dbot_ds.config import RunConfig, from_dict
from dbot_ds.runtime import checkpoint
from dbot_ds.runtime.engine import shutdown_distributed
from dbot_ds.weights.rundir import RunDir

run, out = RunDir(sys.argv[1]), Path(sys.argv[2])
cfg = from_dict(RunConfig, json.loads(run.config.read_text()))
ckpt = checkpoint.latest(run.checkpoints)
with pretraining(cfg, run, fresh=False) as job:
    stage = checkpoint.read_state(ckpt)["stage"]
    task, engine = job.start(stage, ckpt)
    trainer = job.trainer(task, engine, stage)
    step = trainer.resume(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save(engine, out, {"stage": stage, "step": step, "world_size": job.session.world.size,
                                  "zero_stage": engine.zero_optimization_stage(), "config": cfg.to_dict()},
                    is_main=job.session.world.is_main, keep=1)
    engine.destroy()
print(f"rank {job.session.world.rank}: resaved step {step}")
shutdown_distributed()
