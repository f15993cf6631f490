"""The configs of the commands that do not train: `dbot-ds probe` and `dbot-ds bench`."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dbot_ds.config.training import Checks


@dataclasses.dataclass(kw_only=True)
class ProbeConfig:
    """k-NN and linear probe on frozen features (`dbot-ds probe`)."""
    encoders: list[str] = dataclasses.field(default_factory=list)
    train: str = ""
    val: str = ""
    pool: Literal["avg", "cls"] = "avg"
    k: int = 20
    temperature: float = 0.07
    epochs: int = 100
    """Linear-probe epochs on cached features."""
    workers: int = 2
    pipe_urls: bool = False
    """Let the manifests' pipe: URLs run."""
    json: str | None = None

    def __post_init__(self):
        check = Checks()
        check(bool(self.encoders) and bool(self.train) and bool(self.val), "probe needs encoders, --train and --val")
        check(self.k >= 1 and self.epochs >= 1 and self.temperature > 0 and self.workers >= 0,
              "--k and --epochs must be >= 1, --temperature > 0, --workers >= 0")
        check.raise_any("probe config")


@dataclasses.dataclass(kw_only=True)
class BenchConfig:
    """The training-step benchmark's sweep (`dbot-ds bench`)."""
    sizes: list[str] = dataclasses.field(default_factory=lambda: ["vit_base"])
    micro: list[int] = dataclasses.field(default_factory=lambda: [64])
    accum: list[int] = dataclasses.field(default_factory=lambda: [1])
    zero: list[int] = dataclasses.field(default_factory=lambda: [1])
    compile: list[str] = dataclasses.field(default_factory=lambda: ["off"])
    teacher_graph: list[Literal["off", "on"]] = dataclasses.field(default_factory=lambda: ["off"])
    overlap_comm: list[Literal["auto", "on", "off"]] = dataclasses.field(default_factory=lambda: ["auto"])
    img_size: int = 224
    steps: int = 20
    warmup: int = 5
    repeats: int = 3
    peak_tflops: float | None = None
    fp32: bool = False
    no_plain: bool = False
    data: Literal["synthetic", "shards"] = "synthetic"
    shards: str | None = None
    workers: int = 8
    decode: Literal["cpu", "device"] = "cpu"
    set: list[str] = dataclasses.field(default_factory=list)
    """Run-config overrides (key=value), as `dbot-ds pretrain --set`."""
    json: str | None = None
    markdown: bool = False

    def __post_init__(self):
        check = Checks()
        check(min(self.micro + self.accum) >= 1 and self.steps >= 1 and self.repeats >= 1 and self.warmup >= 0,
              "--micro, --accum, --steps and --repeats must be >= 1, --warmup >= 0")
        check(all(z in (0, 1, 2, 3) for z in self.zero), f"--zero takes ZeRO stages 0..3, got {self.zero}")
        check(self.data == "synthetic" or bool(self.shards), "--data shards needs --shards MANIFEST")
        check(self.workers >= 0 and self.img_size >= 1, "--workers must be >= 0, --img-size >= 1")
        check.raise_any("bench config")
