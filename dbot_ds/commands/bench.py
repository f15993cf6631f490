"""`dbot-ds bench`: the full dBOT training step (teacher forward, student forward + backward,
optimizer step) through the same code as training, on synthetic data already on the device.

A timed step is an optimizer step of the global batch (`--accum` micro-batches). Prints
images/s, achieved TFLOP/s from the analytic FLOP model (flops.py, equal to
torch.utils.flop_counter's count), MFU against the device's dense bf16 peak, a per-phase
breakdown (from a separate, synchronised pass), peak memory, the host synchronisations of a step,
and the DeepSpeed engine's step time against a plain PyTorch loop with the same kernels (bf16
weights, fp32 masters, the same AdamW), interleaved in one run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from dbot_ds.config import BenchConfig, ConfigError, RunConfig, load_config
from dbot_ds.config.schema import from_namespace
from dbot_ds.data.loader import pretrain_loader
from dbot_ds.data.transforms import normalize_on_device
from dbot_ds.input_norms import STUDENT_NORM
from dbot_ds.method.flops import dbot_flops_per_image
from dbot_ds.method.policies import build_policy
from dbot_ds.method.stages import fresh_student
from dbot_ds.method.tasks import DistillTask
from dbot_ds.method.teacher import TeacherWeights, random_encoder
from dbot_ds.runtime import engine as ds_engine
from dbot_ds.runtime.accel import apply_fast_paths, try_compile
from dbot_ds.runtime.distributed import World
from dbot_ds.runtime.ds_config import compute_dtype, resolve_ds_config, zero_stage
from dbot_ds.runtime.measure import (Timer, device_peak, host_syncs, peak_memory_gb, reset_peak_memory,
                                     saved_activation_bytes)
from dbot_ds.runtime.plain_engine import PlainEngine
from dbot_ds.runtime.trainer import micro_step


def bench_config(size: str, micro: int, zero: int, compile_backend: str, teacher_graph: bool,
                 img_size: int, bf16: bool, extra: list[str], accum: int = 1) -> RunConfig:
    """One process, a global batch of `accum` micro-batches (accumulation as training runs)."""
    return load_config(None, None, [f"model.size={size}", f"model.img_size={img_size}",
                                    f"batch.micro_batch={micro}", f"batch.global_batch={micro * accum}",
                                    f"compile={compile_backend}", f"cuda_graph_teacher={str(teacher_graph).lower()}",
                                    f"deepspeed=bench_zero{zero}{'_bf16' if bf16 else ''}", *extra])


class Phases:
    """The step's `phases` argument for the breakdown pass: synchronises around each phase and
    records its time (a separate pass: the syncs cost throughput). Masking and the loss fall
    between the phases."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.times = {k: [] for k in ("teacher_forward", "student_forward", "backward", "optimizer")}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.sync()
        t = time.perf_counter()
        yield
        self.sync()
        self.times[phase].append(time.perf_counter() - t)


def phase_breakdown(task, engine, imgs, device, steps: int, accum: int) -> dict:
    """Median seconds per optimizer step (`accum` micro-batches) in each phase of the step."""
    phases = Phases(device)
    for _ in range(steps * accum):
        micro_step(task, engine, imgs, phases)
    per_step = {k: [sum(v[i:i + accum]) for i in range(0, len(v), accum)] for k, v in phases.times.items()}
    return {k: statistics.median(v) for k, v in per_step.items()}


def distill_setup(cfg: RunConfig, ds: dict, device):
    """What `dbot-ds pretrain` builds for stage 1, with a random full-depth teacher: the teacher
    policy's teacher and student, the DeepSpeed engine, the DistillTask."""
    dtype = compute_dtype(ds)
    weights = TeacherWeights(random_encoder(cfg.model.encoder_arch(), 0), "bench", STUDENT_NORM)
    policy = build_policy(cfg, lambda stage: weights, dtype)
    teacher, student = policy.start(1, lambda width: fresh_student(cfg, 1, width))
    teacher = teacher.to(device)
    return DistillTask(cfg, teacher, policy), ds_engine.build_engine(student, cfg, ds, device)


def run_case(cfg: RunConfig, device, *, steps: int, warmup: int, repeats: int, peak: float | None,
             compare_plain: bool, loader=None, overlap_comm: bool | None = None) -> dict:
    """Times optimizer steps of the global batch (gradient accumulation included) through the
    training code. overlap_comm: override the resolved ZeRO setting (None: the config's)."""
    reset_peak_memory(device)
    ds = resolve_ds_config(cfg, 1)
    if overlap_comm is not None:
        ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "overlap_comm": overlap_comm}
    dtype, accum = compute_dtype(ds), ds["gradient_accumulation_steps"]
    arch = cfg.model.encoder_arch()
    task, eng = distill_setup(cfg, ds, device)
    imgs = normalize_on_device(torch.randint(0, 256, (cfg.batch.micro_batch, 3, arch.img_size, arch.img_size),
                                             dtype=torch.uint8, device=device), device, dtype)  # as prefetched

    def optimizer_step(engine):
        return lambda: [micro_step(task, engine, imgs) for _ in range(accum)]

    ds_step = optimizer_step(eng)
    t = time.perf_counter()
    teacher_input, student_inputs = task.examples(device, dtype)
    apply_fast_paths(cfg.compile, cfg.cuda_graph_teacher, task.teacher, eng.module, teacher_input, student_inputs)
    ds_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_step_s = time.perf_counter() - t  # with compile: compiling, with graphs: capturing
    timer = Timer(device)

    def timed(step_fn, n):
        for _ in range(warmup):
            step_fn()
        timer.start()
        for _ in range(n):
            step_fn()
        return timer.elapsed() / n

    if compare_plain:
        plain = PlainEngine(fresh_student(cfg, 1, task.teacher.target_width), cfg, device, dtype, accum)
        if cfg.compile:  # the same kernels in both loops
            try_compile(plain.module, cfg.compile, *student_inputs, grad=True)
        plain_step = optimizer_step(plain)
    ds_times, plain_times = [], []
    for _ in range(repeats):  # interleaved A B A B
        ds_times.append(timed(ds_step, steps))
        if compare_plain:
            plain_times.append(timed(plain_step, steps))
    syncs = {"deepspeed": host_syncs(ds_step, device)}
    if compare_plain:
        syncs["plain"] = host_syncs(plain_step, device)
        del plain_step, plain  # its weights and optimizer state must not count in the memory below
    reset_peak_memory(device)
    activations = saved_activation_bytes(eng.module, lambda: task.loss(eng, imgs)) / 2**30  # one micro-batch
    breakdown = phase_breakdown(task, eng, imgs, device, max(2, steps // 2), accum)
    memory, reserved = peak_memory_gb(device)
    step_s = statistics.median(ds_times)
    flops = dbot_flops_per_image(arch, cfg.model.decoder_arch(), arch, cfg.mask.ratio, cfg.mask.per_image)
    ips = cfg.batch.global_batch / step_s
    result = {
        "size": cfg.model.size, "img_size": arch.img_size, "micro_batch": cfg.batch.micro_batch,
        "accumulation": accum, "zero_stage": zero_stage(ds), "bf16": dtype == torch.bfloat16,
        "overlap_comm": bool(ds.get("zero_optimization", {}).get("overlap_comm", False)),
        "compile": cfg.compile or "off", "teacher_cuda_graph": task.teacher.graphed is not None,
        "masks_per_image": cfg.mask.per_image, "first_step_s": first_step_s, "step_s": step_s,
        "images_per_s": ips,
        "gflop_per_image": flops.total / 1e9, "tflops": ips * flops.total / 1e12,
        "mfu": ips * flops.total / 1e12 / peak if peak else None,
        "breakdown_s": breakdown,
        "host_syncs_per_step": syncs,
        # the DeepSpeed step's and the teacher's alone (the plain loop is gone by now)
        "peak_memory_gb": memory, "peak_reserved_gb": reserved,
        "activation_gb": activations, "grad_checkpointing": cfg.model.grad_checkpointing,
    }
    if compare_plain:
        result["plain_step_s"] = statistics.median(plain_times)
        result["deepspeed_over_plain"] = step_s / result["plain_step_s"]
    if loader is not None:
        result["end_to_end"] = end_to_end(task, eng, device, loader, steps, warmup, ips)
    eng.destroy()
    return result


def end_to_end(task, eng, device, loader, steps, warmup, synthetic_ips) -> dict:
    """Micro-batches from the training loader (device-ready, prefetched) through the same step."""
    batches = (batch for _, _, batch in loader.batches(0, warmup + steps))
    for _ in range(warmup):
        micro_step(task, eng, next(batches))
    timer = Timer(device)
    timer.start()
    wait = 0.0
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        micro_step(task, eng, batch)
    elapsed = timer.elapsed()
    ips = steps * task.cfg.batch.micro_batch / elapsed
    return {"images_per_s": ips, "of_synthetic": ips / synthetic_ips, "data_wait_s_per_step": wait / steps}


def shard_loader(cfg: RunConfig, b: BenchConfig, device):
    """The training loader over --shards (one process, one micro-batch per step)."""
    dtype = compute_dtype(resolve_ds_config(cfg, 1))
    loader = pretrain_loader(cfg, rank=0, world=1, accum=1, device=device, dtype=dtype)
    needed = b.warmup + b.steps
    if loader.steps_per_epoch < needed:
        raise ConfigError(f"--shards {b.shards}: one epoch holds {loader.steps_per_epoch} batches of "
                          f"{cfg.batch.micro_batch}, the end-to-end run reads {needed} (--warmup + --steps): use "
                          f"more images (dbot-ds shards synthetic --images {needed * cfg.batch.micro_batch}) or "
                          "fewer --steps")
    return loader


def main(args) -> int:
    b = from_namespace(BenchConfig, args, SWEPT)
    device = ds_engine.init_distributed(World(0, 0, 1))
    peak = device_peak(device, b.peak_tflops)
    bf16 = device.type == "cuda" and not b.fp32
    overlaps = {"auto": None, "on": True, "off": False}
    data = [] if b.data == "synthetic" else [
        "data.source=shards", f"data.shards={b.shards}", f"data.num_workers={b.workers}", f"data.decode={b.decode}"]
    results = []
    for size, micro, accum, zero, comp, graph, overlap in itertools.product(
            b.sizes, b.micro, b.accum, b.zero, b.compile, b.teacher_graph, b.overlap_comm):
        # DeepSpeed refuses bf16 without ZeRO (ds_config.py): ZeRO-0 runs in fp32, labelled so
        cfg = bench_config(size, micro, zero, "" if comp == "off" else comp, graph == "on", b.img_size,
                           bf16 and zero > 0, [*data, *b.set], accum)
        loader = shard_loader(cfg, b, device) if b.data == "shards" else None
        r = run_case(cfg, device, steps=b.steps, warmup=b.warmup, repeats=b.repeats, peak=peak,
                     compare_plain=not b.no_plain, loader=loader, overlap_comm=overlaps[overlap])
        if loader is not None:
            r["end_to_end"].update(decode=b.decode, workers=b.workers)
        results.append(r)
        print(format_row(r), flush=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "peak_tflops": peak, "results": results,
              "date": time.strftime("%Y-%m-%d")}
    if b.json:
        Path(b.json).write_text(json.dumps(report, indent=2) + "\n")
    if b.markdown:
        print(markdown_table(results))
    return 0


def format_row(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}% MFU" if r["mfu"] is not None else "MFU n/a (no peak for this device)"
    parts = [f"{r['size']} img{r['img_size']} micro {r['micro_batch']} x {r['accumulation']} zero{r['zero_stage']} "
             f"overlap={'on' if r['overlap_comm'] else 'off'} "
             f"{'bf16' if r['bf16'] else 'fp32'} compile={r['compile']} teacher-graph="
             f"{'on' if r['teacher_cuda_graph'] else 'off'}: {r['images_per_s']:.1f} img/s, "
             f"{r['tflops']:.3f} TFLOP/s, {mfu}, peak mem {r['peak_memory_gb']:.2f} GB, "
             f"activations {r['activation_gb']:.3f} GB per micro-batch"
             f"{' (checkpointed)' if r['grad_checkpointing'] else ''}, "
             f"first step {r['first_step_s']:.1f} s"]
    parts.append("  breakdown (s per optimizer step): " + ", ".join(f"{k} {v:.4f}" for k, v in r["breakdown_s"].items()))
    if "deepspeed_over_plain" in r:
        parts.append(f"  DeepSpeed step / plain PyTorch step: {r['deepspeed_over_plain']:.3f}")
    parts.append("  host synchronisations per optimizer step: " + "; ".join(
        f"{k} {sync_text(v)}" for k, v in r["host_syncs_per_step"].items()))
    if "end_to_end" in r:
        e = r["end_to_end"]
        parts.append(f"  end-to-end with shards ({e.get('decode', 'cpu')} decode): {e['images_per_s']:.1f} img/s = "
                     f"{e['of_synthetic']:.2f} x synthetic, "
                     f"data wait {e['data_wait_s_per_step']:.4f} s/step")
    return "\n".join(parts)


def sync_text(syncs: dict) -> str:
    ops = "" if syncs["tensor_ops"] is None else f" + {syncs['tensor_ops']} tensor ops"
    return f"{syncs['synchronize']} synchronize calls{ops}"


def markdown_table(results: list[dict]) -> str:
    """The rows BENCHMARKS.md keeps, one per result."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    lines = ["| model | img | micro x accum | ZeRO | overlap | dtype | compile | teacher graph | images/s | TFLOP/s "
             "| MFU | DeepSpeed / plain | host syncs / step (DeepSpeed; plain) | end-to-end / synthetic | peak GB |",
             "|" + " --- |" * 15]
    for r in results:
        e2e = r.get("end_to_end")
        e2e = f"{e2e['of_synthetic']:.2f} ({e2e['decode']} decode)" if e2e else "-"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        syncs = "; ".join(sync_text(v) for v in r["host_syncs_per_step"].values())
        lines.append(f"| {r['size']} | {r['img_size']} | {r['micro_batch']} x {r['accumulation']} | {r['zero_stage']} | "
                     f"{'on' if r['overlap_comm'] else 'off'} | "
                     f"{'bf16' if r['bf16'] else 'fp32'} | {r['compile']} | {'on' if r['teacher_cuda_graph'] else 'off'} | "
                     f"{r['images_per_s']:.0f} | {r['tflops']:.1f} | {mfu} | "
                     f"{fmt(r.get('deepspeed_over_plain'), '.3f')} | {syncs} | {e2e} | {r['peak_memory_gb']:.1f} |")
    return "\n".join(lines)


SWEPT = ("sizes", "micro", "accum", "zero", "compile", "teacher_graph", "overlap_comm")  # comma lists


def register(sub) -> None:
    p = sub.add_parser("bench", help="training-step throughput, TFLOP/s and MFU (sweeps)")
    p.add_argument("--sizes", default="vit_base", help="comma-separated model sizes")
    p.add_argument("--micro", default="64", help="comma-separated micro-batches")
    p.add_argument("--accum", default="1", help="comma-separated gradient accumulation steps (global batch = "
                   "micro x accum): a timed step is an optimizer step, as in training")
    p.add_argument("--zero", default="1", help="comma-separated ZeRO stages")
    p.add_argument("--compile", default="off", help="comma-separated: off, inductor, ...")
    p.add_argument("--teacher-graph", default="off", help="comma-separated: off, on (CUDA-graph teacher)")
    p.add_argument("--overlap-comm", default="auto", help="comma-separated: auto (the config's: off in one "
                   "process), on, off: ZeRO's overlap of gradient reduction with the backward")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, help="MFU denominator (default: H100/H200 989, A100 312)")
    p.add_argument("--fp32", action="store_true", help="no bf16 on GPUs")
    p.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch comparison")
    p.add_argument("--data", choices=["synthetic", "shards"], default="synthetic")
    p.add_argument("--shards", help="manifest.json for --data shards")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--decode", choices=["cpu", "device"], default="cpu")
    p.add_argument("--set", action="append", default=[], help="extra run-config overrides")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--markdown", action="store_true", help="end with the results as a markdown table")
    p.set_defaults(func=main)
