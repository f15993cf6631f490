import os

# The suite specifies the CPU behaviour CI checks, also on a GPU machine: it hides the GPU.
# tests/test_gpu.py holds the GPU-only checks: DBOT_TEST_GPU=1 pytest tests/test_gpu.py
if os.environ.get("DBOT_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402

@pytest.fixture(scope="session")
def process_group():
    """One real process group (rank 0 of 1; gloo, NCCL under DBOT_TEST_GPU=1) for the in-process
    DeepSpeed tests."""
    from dbot_ds.runtime.distributed import World
    from dbot_ds.runtime.engine import init_distributed

    return init_distributed(World(0, 0, 1))
