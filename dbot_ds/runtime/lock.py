"""One writer per run directory: an exclusive lock file, taken by rank 0 before anything is
written and kept until the run ends.

The lock names its holder (host, pid, Slurm job and its restart count). A lock is stale, and
taken over, when its holder is an earlier run of this same Slurm job (requeued after a kill: a
lower SLURM_RESTART_COUNT), a process on this host that is gone, or a Slurm job that is no
longer running. Any other holder is refused with a message that says who
holds it and how to clear it.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

from dbot_ds.errors import UserError


class RunLocked(UserError):
    """The run directory is another live process's."""


def me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {}  # being written this instant, or damaged: not provably stale


def slurm_job_running(job: str) -> bool | None:
    """Whether Slurm still runs `job`; None where scontrol cannot tell."""
    if not shutil.which("scontrol"):
        return None
    try:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    return any(f"JobState={s}" in out.stdout for s in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(holder: dict, mine: dict) -> str | None:
    """Why the holder can no longer be writing, or None."""
    if not holder:
        return None
    job = holder.get("slurm_job")
    same_job = bool(job) and job == mine["slurm_job"]  # running, then: this process is in it
    if same_job and holder.get("slurm_restart", 0) < mine["slurm_restart"]:
        return f"it is this Slurm job ({job}) before its requeue"
    if holder.get("host") == mine["host"] and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"]):
        return f"process {holder['pid']} on {holder['host']} is gone"
    if job and not same_job and slurm_job_running(job) is False:
        return f"Slurm job {job} is no longer running"
    return None


def acquire(path: Path) -> str | None:
    """Take the lock at `path`; returns the reason a stale lock was taken over, if one was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mine, took_over = me(), None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            if holder is None:
                continue  # released just now
            if not holder:
                raise RunLocked(f"{path} names no holder (being written this instant, or damaged): if no run is "
                                f"writing {path.parent}, delete {path}")
            reason = stale_reason(holder, mine)
            if reason is None:
                raise RunLocked(
                    f"{path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')}"
                    + (f" (Slurm job {holder['slurm_job']})" if holder.get("slurm_job") else "")
                    + f" since {holder.get('since')}: one run writes a run directory at a time. If that "
                    f"process is gone for good, delete {path}; or pick another --out")
            # Move the stale lock aside under a name of our own, then check that what moved is
            # what was judged stale (another process may have taken it over in between).
            aside = path.with_name(f"{path.name}.stale-{mine['host']}-{mine['pid']}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                continue
            if read_holder(aside) != holder:  # not the one judged stale: give it back and look again
                try:
                    os.link(aside, path)  # unlike a rename, never over a lock taken in between
                except FileExistsError:
                    pass
                except OSError:  # a filesystem without hard links
                    os.replace(aside, path)
                finally:
                    aside.unlink(missing_ok=True)
                continue
            aside.unlink()
            took_over = reason
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        return took_over
    raise RunLocked(f"could not take the lock {path}: other processes keep taking it; pick another --out")


def release(path: Path) -> None:
    holder = read_holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
