"""`dbot-ds slurm submit`: K pre-training stages as a chain of sbatch jobs, each stage's export
the next stage's teacher (afterok dependencies, dependents cancelled when a stage fails).
`dbot-ds slurm finetune`: a fine-tune as one job (after a chain with --after). Every job runs
slurm/train.sbatch: checkpoint on USR1/TERM, requeue, resume."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from dbot_ds.config import load_config, load_finetune
from dbot_ds.files import shipped
from dbot_ds.weights.export import META
from dbot_ds.weights.rundir import RunDir

TEMPLATE = shipped("slurm/train.sbatch")


def sbatch_command(args, name: str, log: str, after: str | None, done: str, command: list[str]) -> list[str]:
    """sbatch for one train.sbatch job in the run directory: `command` (dbot-ds arguments) is
    done once <run>/<done> exists."""
    run = Path(args.out).resolve()
    cmd = ["sbatch", "--parsable", f"--job-name=dbot-{run.name}-{name}", f"--nodes={args.nodes}",
           f"--output={run / 'logs' / log}", "--open-mode=append", f"--time={args.time}"]
    if args.gpus_per_node:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    cmd += [f"--{k}={v}" for k, v in (("partition", args.partition), ("account", args.account)) if v]
    if after:
        cmd += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    cmd += [f"--export=ALL,DBOT_GPUS_PER_NODE={args.gpus_per_node or 1}", *args.sbatch_arg]
    return cmd + [str(TEMPLATE), str(run), done, *command]


def config_args(args) -> list[str]:
    """--recipe / --config / --set as the job passes them on (paths made absolute)."""
    return ([f"--recipe={args.recipe}"] if args.recipe else []) + \
        ([f"--config={Path(args.config).resolve()}"] if args.config else []) + [f"--set={s}" for s in args.set]


def write_submitted(args, config: dict) -> None:
    if not args.dry_run:
        RunDir(args.out).logs.mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "submitted_config.json").write_text(json.dumps(config, indent=2) + "\n")


def submit(args) -> int:
    cfg = load_config(args.recipe, args.config, args.set)  # bad config fails here, before sbatch
    write_submitted(args, cfg.to_dict())
    run, after = RunDir(Path(args.out).resolve()), args.after
    for stage in range(args.first_stage, len(cfg.stages.epochs) + 1):
        done = str(run.export(stage).relative_to(run.root) / META)
        cmd = sbatch_command(args, f"s{stage}", f"stage{stage}.log", after, done,
                             ["pretrain", "--stage", str(stage), "--out", str(run.root), *config_args(args)])
        after = run_or_print(cmd, args.dry_run, f"<stage{stage}>")
        print(f"stage {stage}: job {after}" if not args.dry_run else shlex.join(cmd))
    if args.then:
        cmd = ["sbatch", "--parsable", f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes",
               f"--output={run.logs / 'downstream.log'}", "--open-mode=append", *shlex.split(args.then)]
        job = run_or_print(cmd, args.dry_run, "<downstream>")
        print(f"downstream: job {job}" if not args.dry_run else shlex.join(cmd))
    return 0


def finetune(args) -> int:
    data = {k: str(Path(v).resolve()) for k, v in (("train", args.train), ("val", args.val)) if v}
    prefix = "teacher:" if args.init.startswith("teacher:") else ""
    init = prefix + str(Path(args.init.removeprefix(prefix)).resolve())
    cfg = load_finetune(args.recipe, args.config, args.set, init=init, data=data)  # checked before sbatch
    write_submitted(args, cfg.to_dict())
    run = RunDir(Path(args.out).resolve())
    command = ["finetune", init, "--out", str(run.root), *[f"--{k}={v}" for k, v in data.items()], *config_args(args)]
    cmd = sbatch_command(args, "finetune", "finetune.log", args.after, run.summary.name, command)
    job = run_or_print(cmd, args.dry_run, "<finetune>")
    print(f"finetune: job {job}" if not args.dry_run else shlex.join(cmd))
    return 0


def run_or_print(cmd: list[str], dry_run: bool, placeholder: str) -> str:
    if dry_run:
        return placeholder
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"sbatch failed: {r.stderr.strip()}", file=sys.stderr)
        raise SystemExit(r.returncode)
    return r.stdout.strip().split(";")[0]


def add_job_args(p) -> None:
    p.add_argument("--recipe")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="run directory on a filesystem every node sees")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 on CPU-only test clusters")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", default="2-00:00:00", help="per job; long runs requeue themselves")
    p.add_argument("--after", help="make the (first) job wait for this job id (afterok)")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")


def register(sub) -> None:
    p = sub.add_parser("slurm", help="submit pre-training stages (a chain) or a fine-tune as Slurm jobs")
    jobs = p.add_subparsers(dest="slurm_command", required=True)
    p = jobs.add_parser("submit", help="submit the run's stages as a chain of sbatch jobs")
    add_job_args(p)
    p.add_argument("--first-stage", type=int, default=1, help="resubmit from this stage on")
    p.add_argument("--then", help="an sbatch script (and its arguments) to run after the last stage")
    p.set_defaults(func=submit)
    p = jobs.add_parser("finetune", help="submit `dbot-ds finetune` as a preemptible, requeueing job")
    add_job_args(p)
    p.add_argument("init", help="the encoder to fine-tune (as `dbot-ds finetune`)")
    p.add_argument("--train", help="labelled train manifest.json")
    p.add_argument("--val", help="labelled validation manifest.json")
    p.set_defaults(func=finetune)
