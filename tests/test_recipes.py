"""Every named recipe builds and runs 2 steps at tiny size on CPU (tiny models, all else kept)."""

import pytest
import torch
from conftest import TINY
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from dbot_ds.config import load_config
from dbot_ds.recipes import NEEDS_TEACHER, PAPER_ROWS, RECIPES, recipe_dict
from dbot_ds.train import pretrain

# Tiny sizes and data, CPU DeepSpeed config; the recipe's method settings stay as they are.
SWAP = [s for s in TINY if not s.startswith(("stages.", "optim.warmup"))] + ["stop_at_step=2", "data.source=synthetic"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A timm-layout teacher file, and a 'bigger' one: wider and with another patch size."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    same = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    bigger = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=3, num_heads=1, num_classes=0,
                               pre_norm=True)
    save_file(same.state_dict(), str(root / "same.safetensors"))
    save_file(bigger.state_dict(), str(root / "bigger.safetensors"))
    return root


@pytest.mark.parametrize("name", sorted(set(RECIPES) - {"demo", "demo_shards", "digits"}))  # own data
def test_recipe_runs_two_steps_at_tiny_size(name, teachers, tmp_path, process_group):
    sets = list(SWAP)
    if recipe_dict(name).get("teacher", {}).get("init") == NEEDS_TEACHER:
        kind = "bigger" if "_teacher_" in name else "same"
        sets.append(f"teacher.init={teachers / f'{kind}.safetensors'}")
    cfg = load_config(name, None, sets)
    assert name in PAPER_ROWS
    pretrain(cfg, tmp_path)
    from dbot_ds import checkpoint
    state = checkpoint.read_state(checkpoint.latest(tmp_path / "checkpoints"))
    assert state["global_step"] == 2 and state["config"]["recipe"] == name
