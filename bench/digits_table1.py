"""Table 1's claim at small scale: the initial teacher stops mattering after a few stages.

On scikit-learn's digits (no download), three stage-0 teachers of different kinds, each
distilled for 3 stages with the same recipe (`digits`, 40 epochs a stage):
- random: a random ViT (the paper's stage-1 teacher for ViT-B);
- random_depth0: patch embedding + positions only (the authors' stage-1 teacher for ViT-L/H);
- supervised: that random ViT trained with labels on the train split (`dbot-ds finetune`).
Every teacher and student is probed (k-NN and linear, `dbot-ds probe`); the table gives each
stage's accuracies and the spread between teachers.

    python bench/digits_table1.py --out runs/table1        # about 40 min on 2 CPU cores

Every step is a plain dbot-ds command, run in its own process and skipped when its output is
already there, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAGES = 3
# the README's fine-tuning settings for 32 px digits (the ImageNet augmentation is too strong)
SUPERVISED = ["--set", "deepspeed=cpu_demo", "--set", "global_batch=64", "--set", "micro_batch=32",
              "--set", "epochs=30", "--set", "warmup_epochs=2", "--set", "base_lr=2e-3", "--set", "mixup=0.2",
              "--set", "cutmix=0", "--set", "randaug=rand-m5-mstd0.5", "--set", "num_workers=1"]


def dbot(*args: str) -> None:
    print("+ dbot-ds " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "dbot_ds.cli", *args], check=True)


def distil(out: Path, data: Path, name: str, *sets: str) -> Path:
    run = out / name
    if not (run / f"stage{STAGES}" / "meta.json").is_file():
        dbot("pretrain", "--recipe", "digits", "--out", str(run), "--set", f"data.shards={data / 'train' / 'manifest.json'}",
             "--set", f"stages.epochs={[40] * STAGES}".replace(" ", ""), *sets)
    return run


def probe(out: Path, data: Path, name: str, teacher: str, run: Path) -> list[dict]:
    result = out / f"probe_{name}.json"
    if not result.is_file():
        dbot("probe", teacher, *(str(run / f"stage{s}") for s in range(1, STAGES + 1)),
             "--train", str(data / "train" / "manifest.json"), "--val", str(data / "val" / "manifest.json"),
             "--json", str(result))
    return json.loads(result.read_text())


def table(rows: dict[str, list[dict]]) -> tuple[str, dict]:
    names = list(rows)
    lines = ["| stage | " + " | ".join(f"{n} k-NN / linear" for n in names) + " | spread k-NN / linear |",
             "|" + " --- |" * (len(names) + 2)]
    spreads = []
    for stage in range(STAGES + 1):
        knn = [100 * rows[n][stage]["knn_top1"] for n in names]
        lin = [100 * rows[n][stage]["linear_top1"] for n in names]
        spread = {"knn_range": max(knn) - min(knn), "linear_range": max(lin) - min(lin),
                  "knn_variance": statistics.pvariance(knn), "linear_variance": statistics.pvariance(lin)}
        spreads.append(spread)
        label = "0 (teacher)" if stage == 0 else str(stage)
        lines.append(f"| {label} | " + " | ".join(f"{k:.1f} / {v:.1f}" for k, v in zip(knn, lin))
                     + f" | {spread['knn_range']:.1f} / {spread['linear_range']:.1f} |")
    return "\n".join(lines), {"rows": rows, "spread": spreads}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    out = Path(p.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = out / "data"
    if not (data / "val" / "manifest.json").is_file():
        dbot("shards", "digits", "--out", str(data))
    train, val = str(data / "train" / "manifest.json"), str(data / "val" / "manifest.json")

    random_run = distil(out, data, "random")
    depth0_run = distil(out, data, "random_depth0", "--set", "teacher.random_depth=0")
    supervised = out / "supervised_teacher"
    if not (supervised / "model.safetensors").is_file():
        dbot("finetune", f"teacher:{random_run / 'stage1'}", "--train", train, "--val", val, "--out", str(supervised),
             *SUPERVISED)
    supervised_run = distil(out, data, "supervised", "--set", f"teacher.init={supervised / 'model.safetensors'}")

    rows = {"random": probe(out, data, "random", f"teacher:{random_run / 'stage1'}", random_run),
            "random_depth0": probe(out, data, "random_depth0", f"teacher:{depth0_run / 'stage1'}", depth0_run),
            "supervised": probe(out, data, "supervised", str(supervised / "model.safetensors"), supervised_run)}
    markdown, report = table(rows)
    report["wall_s"] = round(time.time() - start)
    (out / "table1.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table1.md").write_text(markdown + "\n")
    print(markdown)
    print(f"wrote {out / 'table1.md'} and {out / 'table1.json'} ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
