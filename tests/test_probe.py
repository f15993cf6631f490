"""Linear probe and k-NN on frozen features; the digits set; `dbot-ds probe` end to end."""

import json

import pytest
import torch
from helpers import tiny_config

from dbot_ds.cli import main
from dbot_ds.commands.probe import extract, knn_accuracy, linear_probe, load_encoder


def clusters(n_per_class=30, classes=4, dim=16, spread=0.3):
    """Train and test points around the same class centres."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    tx = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y, tx, y.clone()


def test_knn_is_perfect_on_separated_clusters_and_chance_on_noise():
    x, y, tx, ty = clusters()
    assert knn_accuracy(x, y, tx, ty) == 1.0
    noise = torch.randn_like(x)
    acc = knn_accuracy(noise, y, torch.randn_like(tx), ty)
    assert acc < 0.5


def test_knn_votes_are_weighted_by_similarity():
    # two near neighbours of class 1 outvote three distant ones of class 0 at a low temperature
    train = torch.tensor([[1.0, 0.02], [1.0, -0.02], [0.2, 1.0], [0.2, -1.0], [0.0, 1.0]])
    labels = torch.tensor([1, 1, 0, 0, 0])
    assert knn_accuracy(train, labels, torch.tensor([[1.0, 0.0]]), torch.tensor([1]), k=5, temperature=0.07) == 1.0


def test_linear_probe_learns_a_linearly_separable_problem():
    x, y, tx, ty = clusters(spread=1.0)
    assert linear_probe(x, y, tx, ty, num_classes=4, epochs=200, lr=1e-2) > 0.9


def test_digits_become_labelled_train_and_val_shards(tmp_path):
    pytest.importorskip("sklearn")
    assert main(["shards", "digits", "--out", str(tmp_path), "--size", "16"]) == 0
    train = json.loads((tmp_path / "train" / "manifest.json").read_text())
    val = json.loads((tmp_path / "val" / "manifest.json").read_text())
    assert (train["total"], val["total"]) == (1438, 359) and len(train["classes"]) == 10


def test_probe_command_on_an_export_and_its_random_teacher(process_group, tmp_path, capsys):
    from helpers import write_shards

    from dbot_ds.commands.pretrain import pretrain
    manifest = write_shards(tmp_path / "shards", [24, 24])
    pretrain(tiny_config("stages.epochs=[1]"), tmp_path / "run")
    export = tmp_path / "run" / "stage1"
    assert main(["probe", f"teacher:{export}", str(export), "--train", str(manifest), "--val", str(manifest),
                 "--epochs", "5", "--workers", "0", "--json", str(tmp_path / "probe.json")]) == 0
    rows = json.loads((tmp_path / "probe.json").read_text())
    assert [r["encoder"] for r in rows] == [f"teacher:{export}", str(export)]
    for row in rows:  # each row is its own encoder's k-NN figure
        features = extract(load_encoder(row["encoder"]), str(manifest), torch.device("cpu"), workers=0)
        assert row["knn_top1"] == knn_accuracy(*features, *features, num_classes=3)
