"""Every named recipe builds and runs 2 steps at tiny size on CPU (tiny models, all else kept)."""

import pytest
import torch
from helpers import TINY
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from dbot_ds.config import load_config
from dbot_ds.config.recipes import NEEDS_TEACHER, PAPER_ROWS, RECIPES, recipe_dict
from dbot_ds.commands.pretrain import pretrain

# Tiny sizes and data, CPU DeepSpeed config; the recipe's method settings stay as they are.
SWAP = [s for s in TINY if not s.startswith(("stages.", "optim.warmup"))] + ["stop_at_step=2", "data.source=synthetic"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """timm-layout teacher files: one of the student's size, a 'bigger' one (wider, another patch
    size), and a CLIP tower with its projection (timm writes CLIP's proj as a zero-bias head)."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    same = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    bigger = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=3, num_heads=1, num_classes=0,
                               pre_norm=True)
    clip = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=24,
                             pre_norm=True, norm_layer=torch.nn.LayerNorm)
    torch.nn.init.zeros_(clip.head.bias)
    for name, model in {"same": same, "bigger": bigger, "clip": clip}.items():  # tiny widths: heads stated
        save_file(model.state_dict(), str(root / f"{name}.safetensors"),
                  metadata={"num_heads": str(model.blocks[0].attn.num_heads)})
    return root


@pytest.mark.parametrize("name", sorted(set(RECIPES) - {"demo", "demo_shards", "digits"}))  # own data
def test_recipe_runs_two_steps_at_tiny_size(name, teachers, tmp_path, process_group):
    sets = list(SWAP)
    recipe = recipe_dict(name)
    if recipe.get("teacher", {}).get("init") == NEEDS_TEACHER:
        kind = "bigger" if "_teacher_" in name else "clip" if recipe["teacher"].get("project") else "same"
        sets.append(f"teacher.init={teachers / f'{kind}.safetensors'}")
    if recipe.get("mask", {}).get("kind") == "block":  # 78 of 196 patches at full size; the tiny grid has 16
        sets += ["mask.patches=6", "mask.block_min=2"]
    cfg = load_config(name, None, sets)
    assert name in PAPER_ROWS
    pretrain(cfg, tmp_path)
    from dbot_ds.runtime import checkpoint
    state = checkpoint.read_state(checkpoint.latest(tmp_path / "checkpoints"))
    assert state["global_step"] == 2 and state["config"]["recipe"] == name
