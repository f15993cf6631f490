"""`dbot-ds bench` on CPU at tiny size; the compile switch and its fallback."""

import json
import random

import pytest
import torch
from helpers import TINY_DECODER, no_eager_fallback, tiny_config, write_shards

from dbot_ds.runtime.accel import graph_teacher, try_compile
from dbot_ds.commands.bench import bench_config
from dbot_ds.cli import main
from dbot_ds.method.flops import dbot_flops_per_image
from dbot_ds.models import ViT, vit_arch


def test_bench_reports_rates_flops_breakdown_and_the_plain_pytorch_ratio(tmp_path, process_group, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--sizes", "tiny_test", "--img-size", "32", "--micro", "4", "--zero", "1,2",
                 "--steps", "2", "--warmup", "1", "--repeats", "1", "--peak-tflops", "1.0",
                 "--json", str(out), *TINY_DECODER]) == 0
    text = capsys.readouterr().out
    assert "img/s" in text and "DeepSpeed step / plain PyTorch step" in text
    report = json.loads(out.read_text())
    assert [r["zero_stage"] for r in report["results"]] == [1, 2]
    r = report["results"][0]
    cfg = bench_config("tiny_test", 4, 1, "", False, 32, False, TINY_DECODER[1::2])
    arch = cfg.model.encoder_arch()
    flops = dbot_flops_per_image(arch, cfg.model.decoder_arch(), arch, cfg.mask.ratio, cfg.mask.per_image)
    assert r["gflop_per_image"] == pytest.approx(flops.total / 1e9)
    assert r["images_per_s"] == pytest.approx(4 / r["step_s"]) and r["accumulation"] == 1
    assert r["tflops"] == pytest.approx(r["images_per_s"] * flops.total / 1e12) and r["mfu"] == pytest.approx(r["tflops"])
    assert r["deepspeed_over_plain"] == pytest.approx(r["step_s"] / r["plain_step_s"])
    assert set(r["breakdown_s"]) == {"teacher_forward", "student_forward", "backward", "optimizer"}
    assert all(v > 0 for v in r["breakdown_s"].values())


def test_bench_end_to_end_with_real_shards(tmp_path, process_group, capsys):
    manifest = write_shards(tmp_path / "shards", [20, 20])
    assert main(["bench", "--sizes", "tiny_test", "--img-size", "32", "--micro", "4", "--steps", "2",
                 "--warmup", "1", "--repeats", "1", "--no-plain", "--data", "shards", "--shards", str(manifest),
                 "--workers", "0", "--json", str(tmp_path / "b.json"), *TINY_DECODER]) == 0
    e2e = json.loads((tmp_path / "b.json").read_text())["results"][0]["end_to_end"]
    assert e2e["images_per_s"] > 0 and e2e["of_synthetic"] > 0 and e2e["decode"] == "cpu"


def test_compile_switch_compiles_or_falls_back_to_eager():
    enc = ViT(vit_arch("tiny_test", img_size=32))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        eager = enc(x)
    assert try_compile(enc, "eager", x)  # a backend that needs no compiler
    with torch.no_grad():
        assert torch.allclose(enc(x), eager)
    other = ViT(vit_arch("tiny_test", img_size=32))
    with pytest.warns(UserWarning, match="unavailable here, running eagerly"):
        assert not try_compile(other, "no_such_backend", x)
    with torch.no_grad():
        other(x)  # still runs, eagerly


def test_training_runs_with_the_compile_switch_on(process_group, tmp_path):
    from dbot_ds.commands.pretrain import pretrain
    torch._dynamo.utils.counters.clear()
    with no_eager_fallback():  # "eager" needs no compiler
        pretrain(tiny_config("compile=eager", "stages.epochs=[1]"), tmp_path)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo did capture graphs
    assert (tmp_path / "stage1" / "meta.json").is_file()


def test_cuda_graph_teacher_switch_falls_back_to_eager_without_cuda():
    from dbot_ds.method.teacher import Teacher
    teacher = Teacher(ViT(vit_arch("tiny_test", img_size=32)), "t")
    imgs = torch.randn(4, 3, 32, 32)
    eager = teacher.targets(imgs)
    with pytest.warns(UserWarning, match="CUDA-graph capture needs a CUDA device, running eagerly"):
        assert not graph_teacher(teacher)
    assert teacher.graphed is None and torch.equal(teacher.targets(imgs), eager)


def test_bench_sweeps_the_teacher_graph_switch(tmp_path, process_group):
    out = tmp_path / "bench.json"
    with pytest.warns(UserWarning, match="CUDA-graph capture needs a CUDA device"):
        assert main(["bench", "--sizes", "tiny_test", "--img-size", "32", "--micro", "4", "--steps", "1",
                     "--warmup", "1", "--repeats", "1", "--no-plain", "--teacher-graph", "off,on",
                     "--json", str(out), *TINY_DECODER]) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2  # on CPU the "on" case ran eagerly, and says so
    assert [r["teacher_cuda_graph"] for r in results] == [False, False]


def test_bench_ends_with_a_markdown_table_row_per_result(process_group, capsys):
    assert main(["bench", "--sizes", "tiny_test", "--img-size", "32", "--micro", "4", "--zero", "1,2", "--steps", "1",
                 "--warmup", "1", "--repeats", "1", "--markdown", *TINY_DECODER]) == 0
    table = capsys.readouterr().out.split("| model |")[1].splitlines()[2:]
    assert [row.split(" | ")[:5] for row in table] == [["| tiny_test", "32", "4 x 1", "1", "off"],
                                                      ["| tiny_test", "32", "4 x 1", "2", "off"]]
    assert all(row.split(" | ")[10] == "-" for row in table)  # no MFU without a known peak
    # explicit synchronize calls are counted everywhere; tensor ops on CUDA only
    assert all(row.split(" | ")[12] == "0 synchronize calls; 0 synchronize calls" for row in table)


def test_bench_refuses_shards_too_small_for_the_end_to_end_run_before_timing(tmp_path, process_group, capsys):
    manifest = write_shards(tmp_path / "shards", [10, 10])  # 5 batches of 4
    assert main(["bench", "--sizes", "tiny_test", "--img-size", "32", "--micro", "4", "--steps", "5", "--warmup", "2",
                 "--no-plain", "--data", "shards", "--shards", str(manifest), "--workers", "0", *TINY_DECODER]) == 2
    assert "one epoch holds 5 batches of 4, the end-to-end run reads 7" in capsys.readouterr().err


def test_bench_options_are_checked_like_every_config(capsys):
    assert main(["bench", "--teacher-graph", "off,maybe"]) == 2
    assert "teacher_graph 'maybe' is not one of 'off', 'on'" in capsys.readouterr().err


def test_every_transformer_block_stays_compiled_through_training(process_group, tmp_path):
    """12 encoder blocks with 12 drop-path rates, the decoder's and the teacher's: more variants
    of timm's Block.forward than dynamo's default cap of 8, past which it would run the rest
    eagerly and say nothing. Here hitting the cap is an error."""
    import torch._dynamo

    from dbot_ds.commands.pretrain import pretrain
    cfg = tiny_config("model.size=vit_tiny", "model.img_size=64", "compile=eager", "stages.epochs=[1]")
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), no_eager_fallback():
        pretrain(cfg, tmp_path)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 12  # a graph per student block at least


def test_the_clip_recipes_beit_blocks_compile_one_by_one():
    from timm.models.beit import Block as BeitBlock

    from dbot_ds.method.masking import block_masking
    from dbot_ds.method.student import Student
    arch = vit_arch("tiny_test", img_size=32, family="beit", layer_scale=0.1)
    student = Student(arch, None, 16, drop_path=0.1)
    masks = block_masking(2, arch.grid, 6, random.Random(0), min_block=2)
    with no_eager_fallback():
        assert try_compile(student, "eager", torch.randn(2, 3, 32, 32), masks, grad=True)
    blocks = [m for m in student.modules() if isinstance(m, BeitBlock)]
    assert len(blocks) == arch.depth and all(b._compiled_call_impl is not None for b in blocks)
    assert student._compiled_call_impl is None  # the blocks, not the whole module


def test_a_timed_step_is_an_optimizer_step_of_the_accumulated_global_batch(tmp_path, process_group):
    out = tmp_path / "bench.json"
    assert main(["bench", "--sizes", "tiny_test", "--img-size", "32", "--micro", "4", "--accum", "1,3",
                 "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(out), *TINY_DECODER]) == 0
    one, three = json.loads(out.read_text())["results"]
    assert (one["accumulation"], three["accumulation"]) == (1, 3)
    assert three["images_per_s"] == pytest.approx(12 / three["step_s"])
    # three micro-batches of forward and backward per step, one optimizer update
    assert three["breakdown_s"]["backward"] > 1.5 * one["breakdown_s"]["backward"]


def test_deepspeed_steps_make_no_explicit_device_synchronisation(process_group, tmp_path):
    """DeepSpeed's throughput timer calls its accelerator's synchronize() in every forward and
    step (counted here on CPU too): the resolved configs turn it off."""
    from dbot_ds.commands.bench import run_case
    cfg = bench_config("tiny_test", 4, 1, "", False, 32, False, TINY_DECODER[1::2])
    r = run_case(cfg, torch.device("cpu"), steps=1, warmup=0, repeats=1, peak=None, compare_plain=True)
    assert r["host_syncs_per_step"]["deepspeed"]["synchronize"] == 0
    assert r["host_syncs_per_step"]["plain"]["synchronize"] == 0
    timed = tmp_path / "timer_on.json"
    timed.write_text(json.dumps({"zero_optimization": {"stage": 1}, "timers": {"throughput": {"enabled": True}}}))
    cfg = bench_config("tiny_test", 4, 1, "", False, 32, False, [*TINY_DECODER[1::2], f"deepspeed={timed}"])
    r = run_case(cfg, torch.device("cpu"), steps=1, warmup=0, repeats=1, peak=None, compare_plain=False)
    assert r["host_syncs_per_step"]["deepspeed"]["synchronize"] >= 2  # the counter sees them


def test_the_gpu_plan_writes_its_report_as_each_step_finishes(tmp_path):
    """bench/gpu_plan.sh at tiny size on CPU: each step under its own timeout, the report
    rewritten after each (what a command killed at its limit would still return)."""
    import os
    import subprocess
    from pathlib import Path

    from helpers import subprocess_env
    env = {**subprocess_env(), "CASES": "tiny_test:8", "IMG": "32", "STEPS": "1", "WORK": str(tmp_path / "work")}
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_plan.sh"
    done = subprocess.run([str(script), str(tmp_path / "out"), "1", "3"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["plan.log", "report.json", "report.md", "times.txt"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["step"] for r in report["results"]] == ["step1", "step3", "step3"]  # step 3: accum 1 and 4
    assert [r["accumulation"] for r in report["results"]] == [1, 1, 4]
    assert "step1: exit 0" in (tmp_path / "out" / "times.txt").read_text()


def test_activation_checkpointing_lowers_the_activation_memory_the_benchmark_measures(process_group):
    from dbot_ds.commands.bench import run_case

    measured = {}
    for on in ("false", "true"):
        cfg = bench_config("tiny_test", 4, 1, "", False, 32, False, [*TINY_DECODER[1::2], f"model.grad_checkpointing={on}"])
        r = run_case(cfg, torch.device("cpu"), steps=1, warmup=0, repeats=1, peak=None, compare_plain=False)
        measured[on] = r["activation_gb"]
        assert r["grad_checkpointing"] is (on == "true")
    assert 0 < measured["true"] < 0.6 * measured["false"]
