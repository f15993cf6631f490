"""Analyses on constructed inputs with known answers, and `dbot-ds analyze` end to end."""

import dataclasses
import json

import pytest
import torch
from helpers import tiny_config

from dbot_ds.commands.analyze import (analyze, attention_maps, first_singular_box, iou, mean_attention_distance,
                             patch_distances, singular_value_share)
from dbot_ds.cli import main
from dbot_ds.models import ViT, vit_arch


def test_attention_to_the_right_neighbour_has_a_distance_of_one_patch():
    grid, patch = 4, 16
    n = grid * grid
    attn = torch.zeros(1, 2, n, n)
    for i in range(n):
        y, x = divmod(i, grid)
        attn[0, 0, i, y * grid + (x + 1) % grid] = 1.0  # head 0: the right neighbour (wrapping)
        attn[0, 1, i, i] = 1.0                           # head 1: itself
    d = mean_attention_distance(attn, patch_distances(grid, patch))
    assert torch.allclose(d, torch.tensor([(3 * 16 + 48) / 4, 0.0]))  # 3 of 4 columns step 16 px, one wraps 48


def test_singular_value_share_of_a_rank_one_matrix_is_one():
    f = torch.outer(torch.randn(10), torch.randn(8)).unsqueeze(0)
    assert torch.allclose(singular_value_share(f, 1), torch.tensor([1.0]), atol=1e-5)
    assert singular_value_share(torch.randn(1, 50, 50), 1) < 0.2


def test_first_singular_vector_finds_a_constructed_object():
    grid, patch = 8, 16
    feats = torch.randn(grid * grid, 32) * 0.01
    obj = [r * grid + c for r in range(2, 5) for c in range(3, 6)]  # a 3x3 block of patches
    feats[obj] += torch.randn(32)  # the object's patches share a distinct feature
    box = first_singular_box(feats, grid, patch)
    assert box == (48, 32, 96, 80) and iou(box, (48, 32, 96, 80)) == 1.0


def test_attention_maps_match_the_block_output():
    enc = ViT(vit_arch("tiny_test", img_size=32)).eval()
    x = torch.randn(2, 17, 32)
    blk = enc.blocks[0]
    attn = attention_maps(blk, x)
    assert attn.shape == (2, 2, 17, 17) and torch.allclose(attn.sum(-1), torch.ones(2, 2, 17))
    a = blk.attn
    v = a.qkv(blk.norm1(x)).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
    manual = x + a.proj((attn @ v).transpose(1, 2).reshape(2, 17, 32))
    manual = manual + blk.mlp(blk.norm2(manual))
    with torch.no_grad():
        assert torch.allclose(blk(x), manual, atol=1e-5)


@pytest.mark.parametrize("depth", [0, 3])
def test_analyze_gives_one_row_per_block_and_corloc_against_the_boxes(depth):
    enc = ViT(dataclasses.replace(vit_arch("tiny_test", img_size=32), depth=depth)).eval()
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = enc(imgs, final_norm=False)[:, 1:]  # what the last block gives analyze
    found = [first_singular_box(f, enc.arch.grid, enc.arch.patch_size) for f in feats]
    result = analyze(enc, imgs, k=2, boxes=[[box] for box in found])
    assert len(result["attention_distance"]) == depth and len(result["singular_share"]) == depth
    assert all(len(heads) == enc.arch.heads for heads in result["attention_distance"])
    assert result["corloc"] == 1.0
    elsewhere = [[(100, 100, 101, 101)]] * 3  # outside the image: no overlap
    assert analyze(enc, imgs, k=2, boxes=elsewhere)["corloc"] == 0.0


def test_the_analyze_command(process_group, tmp_path):
    from helpers import write_shards

    from dbot_ds.commands.pretrain import pretrain
    manifest = write_shards(tmp_path / "shards", [8])
    pretrain(tiny_config("stages.epochs=[1]"), tmp_path / "run")
    (tmp_path / "boxes.json").write_text(json.dumps([[[0, 0, 32, 32]]] * 8))
    assert main(["analyze", str(tmp_path / "run" / "stage1"), "--manifest", str(manifest),
                 "--boxes", str(tmp_path / "boxes.json"), "--out", str(tmp_path / "a")]) == 0
    out = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert out["images"] == 8 and "corloc" in out
    assert (tmp_path / "a" / "attention_distance.png").stat().st_size > 1000
