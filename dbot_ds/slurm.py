"""`dbot-ds slurm submit`: K stages as a chain of sbatch jobs, each stage's export the next
stage's teacher (afterok dependencies, dependents cancelled when a stage fails)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from dbot_ds.config import load_config
from dbot_ds.files import shipped

TEMPLATE = shipped("slurm/stage.sbatch")


def sbatch_command(args, stage: int, after: str | None, pretrain_args: list[str]) -> list[str]:
    run = Path(args.out).resolve()
    cmd = ["sbatch", "--parsable", f"--job-name=dbot-{run.name}-s{stage}", f"--nodes={args.nodes}",
           f"--output={run / 'logs' / f'stage{stage}.log'}", "--open-mode=append", f"--time={args.time}"]
    if args.gpus_per_node:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    cmd += [f"--{k}={v}" for k, v in (("partition", args.partition), ("account", args.account)) if v]
    if after:
        cmd += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    cmd += [f"--export=ALL,DBOT_GPUS_PER_NODE={args.gpus_per_node or 1}", *args.sbatch_arg]
    return cmd + [str(TEMPLATE), str(stage), str(run), *pretrain_args]


def submit(args) -> int:
    pretrain_args = ([f"--recipe={args.recipe}"] if args.recipe else []) + \
        ([f"--config={Path(args.config).resolve()}"] if args.config else []) + \
        [f"--set={s}" for s in args.set]
    cfg = load_config(args.recipe, args.config, args.set)  # bad config fails here, before sbatch
    stages = range(args.first_stage, len(cfg.stages.epochs) + 1)
    if not args.dry_run:
        (Path(args.out) / "logs").mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "submitted_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    after = args.after
    for stage in stages:
        cmd = sbatch_command(args, stage, after, pretrain_args)
        after = run_or_print(cmd, args.dry_run, f"<stage{stage}>")
        print(f"stage {stage}: job {after}" if not args.dry_run else shlex.join(cmd))
    if args.then:
        cmd = ["sbatch", "--parsable", f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes",
               f"--output={Path(args.out).resolve() / 'logs' / 'downstream.log'}", "--open-mode=append",
               *shlex.split(args.then)]
        job = run_or_print(cmd, args.dry_run, "<downstream>")
        print(f"downstream: job {job}" if not args.dry_run else shlex.join(cmd))
    return 0


def run_or_print(cmd: list[str], dry_run: bool, placeholder: str) -> str:
    if dry_run:
        return placeholder
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"sbatch failed: {r.stderr.strip()}", file=sys.stderr)
        raise SystemExit(r.returncode)
    return r.stdout.strip().split(";")[0]


def add_commands(sub) -> None:
    p = sub.add_parser("submit", help="submit the run's stages as a chain of sbatch jobs")
    p.add_argument("--recipe")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="run directory on a filesystem every node sees")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 on CPU-only test clusters")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", default="2-00:00:00", help="per job; long stages requeue themselves")
    p.add_argument("--first-stage", type=int, default=1, help="resubmit from this stage on")
    p.add_argument("--after", help="make the first stage wait for this job id (afterok)")
    p.add_argument("--then", help="an sbatch script (and its arguments) to run after the last stage")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    p.set_defaults(func=submit)
