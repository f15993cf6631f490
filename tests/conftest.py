import contextlib
import os
import warnings

# The suite specifies the CPU behaviour CI checks, also on a GPU machine: it hides the GPU.
# tests/test_gpu.py holds the GPU-only checks: DBOT_TEST_GPU=1 pytest tests/test_gpu.py
if os.environ.get("DBOT_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402

from dbot_ds.config import RunConfig, load_config  # noqa: E402

# A tiny run: 16 patches of 8 px, 2 blocks; 64 generated images, global batch 16 as 2 micro
# batches of 8 (gradient accumulation 2 in one process) -> 4 steps per epoch.
TINY = [
    "deepspeed=cpu_demo", "model.size=tiny_test", "model.img_size=32",
    "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2",
    "batch.global_batch=16", "batch.micro_batch=8", "optim.warmup_epochs=1",
    "data.synthetic_images=64", "data.num_workers=0", "stages.epochs=[2,2]", "log_every=2",
]


def tiny_args(*extra: str) -> list[str]:
    """The tiny run (plus `extra` overrides) as command-line --set arguments."""
    return [arg for s in (*TINY, *extra) for arg in ("--set", s)]


# The tiny decoder as `dbot-ds bench` arguments (bench builds its own config around a model size).
TINY_DECODER = [arg for s in TINY if s.startswith("model.decoder_") for arg in ("--set", s)]


# The paper's recipes need their ImageNet shards named; config-only tests give a placeholder.
PAPER_DATA = "data.shards=/data/imagenet/train/manifest.json"


def subprocess_env() -> dict:
    """The environment for a child launcher: without this process's rendezvous variables."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@contextlib.contextmanager
def no_eager_fallback():
    """Fails if a compile or CUDA-graph switch fell back to eager (its warning says so)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallbacks = [str(w.message) for w in caught if "running eagerly" in str(w.message)]
    assert not fallbacks, fallbacks


def tiny_config(*overrides: str) -> RunConfig:
    return load_config(None, None, [*TINY, *overrides])


@pytest.fixture(scope="session")
def process_group():
    """One real process group (rank 0 of 1; gloo, NCCL under DBOT_TEST_GPU=1) for the in-process
    DeepSpeed tests."""
    from dbot_ds.distributed import World
    from dbot_ds.engine import init_distributed

    return init_distributed(World(0, 0, 1))
