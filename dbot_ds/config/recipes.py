"""Named runs: every pre-training recipe of the paper (partial configs over RunConfig's
defaults, the paper's Table A1 default column; `base` names a recipe it extends), and the
fine-tuning presets (over FinetuneConfig's). Data only.

DeepSpeed configs (ds_configs/) are chosen for nodes of 8 GPUs with 80-141 GB: at 224 px memory
is not the constraint (ViT-H student + AdamW states ~10 GiB; activations 43/69/124 MB per image
for B/L/H with the asymmetric decoder, about 4x that without it), so every recipe uses bf16 with
ZeRO-1 (optimizer states sharded, no extra communication in the step); ZeRO-3 costs speed and
is only for bigger models or micro-batches. Micro-batches keep activations near 10-30 GB per GPU.
"""

from __future__ import annotations

import copy

from dbot_ds.config.schema import ConfigError, deep_merge

NEEDS_TEACHER = ""  # teacher.init left empty: the run must be given --set teacher.init=PATH
# The paper's recipes read ImageNet shards; the run must be given --set data.shards=MANIFEST.
_IMAGENET = {"source": "shards", "shards": ""}

# Main branch (PRETRAIN.md): ViT-B clips the global gradient norm at 3.0, ViT-L/H do not clip.
_B = {"model": {"size": "vit_base"}, "deepspeed": "vit_base", "batch": {"micro_batch": 256}, "data": _IMAGENET,
      "optim": {"grad_clip": 3.0}}
_L = {"model": {"size": "vit_large"}, "deepspeed": "vit_large", "batch": {"micro_batch": 128}, "data": _IMAGENET,
      "teacher": {"random_depth": 0}}  # authors' stage-1 teacher for L/H: patch + position only
_H = {"model": {"size": "vit_huge"}, "deepspeed": "vit_huge", "batch": {"micro_batch": 128}, "data": _IMAGENET,
      "teacher": {"random_depth": 0}}
# A CLIP teacher's target: ln_post, then CLIP's visual projection, with no further normalisation.
_CLIP_TARGET = {"final_norm": True, "project": True, "normalize_target": False}
# Recipe ⌘ (Table A1 right column; the authors' beit branch: PRETRAIN.md over run.sh's defaults):
# a BEiT-style student without decoder, block-wise masking of 78 patches (for B, L and H), the
# loss over masked patches only, 1 stage of 1600 epochs.
_CLIP = {"model": {"family": "beit", "decoder": False, "drop_path": 0.1, "layer_scale": 0.1},
         "mask": {"kind": "block", "patches": 78, "block_min": 16, "block_aspect": 0.3},
         "loss": {"kind": "cosine", "tokens": "masked"},
         "teacher": {"init": NEEDS_TEACHER, "random_depth": None, **_CLIP_TARGET},
         "optim": {"betas": [0.9, 0.98], "eps": 1e-6, "lr": 3e-3, "min_lr": 1e-5, "warmup_epochs": 10,
                   "grad_clip": 3.0},
         "data": {"crop_scale": [0.4, 1.0], "color_jitter": 0.4}, "stages": {"epochs": [1600]}}
# Table 1: a pretrained stage-0 teacher, then bootstrapping; 3 stages give every column of it.
_PRETRAINED = {"teacher": {"init": NEEDS_TEACHER, "random_depth": None}, "stages": {"epochs": [800, 800, 800]}}
_BIGGER = {"teacher": {"init": NEEDS_TEACHER, "random_depth": None}, "stages": {"epochs": [800]}}

RECIPES: dict[str, dict] = {
    # A tiny 2-stage run on CPU with images it generates itself (the README's first command).
    "demo": {
        "deepspeed": "cpu_demo",
        "model": {"size": "vit_demo", "img_size": 32, "drop_path": 0.1,
                  "decoder_width": 64, "decoder_depth": 2, "decoder_heads": 4},
        "batch": {"global_batch": 64, "micro_batch": 32},
        "optim": {"base_lr": 1.5e-3, "warmup_epochs": 1},
        "data": {"synthetic_images": 2048, "num_workers": 1},
        "stages": {"epochs": [4, 4]},
        "log_every": 8,
    },
    "demo_shards": {"base": "demo", "data": {"source": "generated_shards", "num_workers": 1}},
    # The README's small real experiment: scikit-learn's digits (`dbot-ds shards digits`).
    "digits": {"base": "demo", "data": {"source": "shards", "shards": "runs/digits_data/train/manifest.json",
                                        "num_workers": 1}, "batch": {"global_batch": 64, "micro_batch": 64},
               "stages": {"epochs": [40, 40]}, "optim": {"warmup_epochs": 4}, "log_every": 20},
    # Defaults: 2 stages x 800 epochs for classification, 3 for detection / segmentation.
    "vit_base": _B, "vit_large": _L, "vit_huge": _H,
    "vit_base_dense": {"base": "vit_base", "stages": {"epochs": [800, 800, 800]}},
    "vit_large_dense": {"base": "vit_large", "stages": {"epochs": [800, 800, 800]}},
    "vit_huge_dense": {"base": "vit_huge", "stages": {"epochs": [800, 800, 800]}},
    "vit_base_from_deit": {"base": "vit_base", **_PRETRAINED},
    "vit_base_from_dino": {"base": "vit_base", **_PRETRAINED},
    "vit_base_from_mae": {"base": "vit_base", **_PRETRAINED},
    # Table 8 (asymmetric) / B7: a CLIP teacher with the default recipe, 1 stage x 1600 epochs.
    "vit_base_from_clip": {"base": "vit_base", "teacher": {"init": NEEDS_TEACHER, "random_depth": None,
                                                           **_CLIP_TARGET}, "stages": {"epochs": [1600]}},
    # Table 7: one stage from a bigger, 2-stage-distilled teacher (a dbot-ds export).
    "vit_base_teacher_large": {"base": "vit_base", **_BIGGER},
    "vit_base_teacher_huge": {"base": "vit_base", **_BIGGER},
    "vit_large_teacher_huge": {"base": "vit_large", **_BIGGER},
    # Tables 8/9: CLIP teachers with recipe ⌘ (CLIP-B/16 for B, CLIP-L/14 for L and H).
    "clip_vit_base": {"base": "vit_base", **_CLIP},
    "clip_vit_large": deep_merge({"base": "vit_large", **_CLIP}, {"batch": {"micro_batch": 128}}),
    "clip_vit_huge": deep_merge({"base": "vit_huge", **_CLIP}, {"batch": {"micro_batch": 64}}),
    # Table 6 ablations (ViT-B, random teacher). 6a: 1600 epochs split into 1, 2 or 3 stages.
    "abl_split_1600": {"base": "vit_base", "stages": {"epochs": [1600]}},
    "abl_split_800_800": {"base": "vit_base"},
    "abl_split_533x3": {"base": "vit_base", "stages": {"epochs": [533, 533, 533]}},  # as the paper
    # 6b: epochs per stage.
    "abl_epochs_400_800": {"base": "vit_base", "stages": {"epochs": [400, 800]}},
    "abl_epochs_800_400": {"base": "vit_base", "stages": {"epochs": [800, 400]}},
    "abl_epochs_800_1200": {"base": "vit_base", "stages": {"epochs": [800, 1200]}},
    # 6c: momentum teachers instead of breakpoints (one stage of 1600 epochs).
    "abl_ema_09998": {"base": "vit_base", "stages": {"epochs": [1600]},
                      "teacher": {"update": "ema", "momentum": 0.9998}},
    "abl_ema_09999": {"base": "vit_base", "stages": {"epochs": [1600]},
                      "teacher": {"update": "ema", "momentum": 0.9999}},
    "abl_ema_cosine": {"base": "vit_base", "stages": {"epochs": [1600]},
                       "teacher": {"update": "ema_cosine", "momentum": 0.996}},
    # 6d: target with the teacher's LayerNorm; 6e: keep the student at breakpoints; 6f: mask ratio.
    "abl_target_ln": {"base": "vit_base", "teacher": {"final_norm": True}},
    "abl_keep_student": {"base": "vit_base", "teacher": {"reinit_student": False}},
    "abl_mask_070": {"base": "vit_base", "mask": {"ratio": 0.7}},
    "abl_mask_080": {"base": "vit_base", "mask": {"ratio": 0.8}},
}

# recipe -> the paper's table / row and the ImageNet top-1 (fine-tuned) it reports, for
# `dbot-ds recipes` and the README.
PAPER_ROWS = {
    "vit_base": "Tab. 2, 7, 8: ViT-B 84.5", "vit_large": "Tab. 2, 7: ViT-L 86.6",
    "vit_huge": "Tab. 2, 7: ViT-H 87.4",
    "vit_base_dense": "Tab. 3, 4: ViT-B det. 52.7 / seg. 49.5 (3 stages)",
    "vit_large_dense": "Tab. 3, 4: ViT-L det. 56.0 / seg. 54.5 (3 stages)",
    "vit_huge_dense": "det./seg. protocol (3 stages), ViT-H: no number in the paper",
    "vit_base_from_deit": "Tab. 1: DeiT teacher, stages 1-3: 83.6 / 84.3 / 84.3",
    "vit_base_from_dino": "Tab. 1: DINO teacher, stages 1-3: 84.2 / 84.5 / 84.4",
    "vit_base_from_mae": "Tab. 1: MAE teacher, stages 1-3: 84.3 / 84.4 / 84.3",
    "vit_base_from_clip": "Tab. 8 (asym.), B7: CLIP teacher, 1 x 1600: 84.9",
    "vit_base_teacher_large": "Tab. 7: B from a 2-stage L teacher: 84.6",
    "vit_base_teacher_huge": "Tab. 3, 4, 7 (dBOT†): B from a 2-stage H teacher: 84.6",
    "vit_large_teacher_huge": "Tab. 3, 4, 7 (dBOT†): L from a 2-stage H teacher: 86.8",
    "clip_vit_base": "Tab. 2, 3, 4, 8, 9: ⌘ CLIP-B/16 teacher, ViT-B 85.7",
    "clip_vit_large": "Tab. 2, 3, 4, 9: ⌘ CLIP-L/14 teacher, ViT-L 87.8",
    "clip_vit_huge": "Tab. 2, 9: ⌘ CLIP-L/14 teacher, ViT-H 88.5",
    "abl_split_1600": "Tab. 6a, B7: 1 stage x 1600: 83.6", "abl_split_800_800": "Tab. 6a: 800-800: 84.5",
    "abl_split_533x3": "Tab. 6a: 533 x 3: 84.4", "abl_epochs_400_800": "Tab. 6b: 400-800: 84.3",
    "abl_epochs_800_400": "Tab. 6b: 800-400: 84.3", "abl_epochs_800_1200": "Tab. 6b: 800-1200: 84.3",
    "abl_ema_09998": "Tab. 6c: EMA 0.9998: 83.6", "abl_ema_09999": "Tab. 6c: EMA 0.9999: 83.9",
    "abl_ema_cosine": "Tab. 6c: cosine(0.996, 1): 82.1", "abl_target_ln": "Tab. 6d: target LN on: 84.3",
    "abl_keep_student": "Tab. 6e: student re-init off: 84.2", "abl_mask_070": "Tab. 6f: mask 0.7: 84.3",
    "abl_mask_080": "Tab. 6f: mask 0.8: 84.2",
}


# Fine-tuning presets. The authors' released scripts: main branch DOWNSTREAM.md over
# main_finetune.py (batch 1024 = 32 x 32 GPUs); beit branch DOWNSTREAM.md over run.sh and
# run_finetune.py for the CLIP recipe's BEiT-style students (absolute lr at batch 1024).
FINETUNE_RECIPES: dict[str, dict] = {
    "vit_base": {"epochs": 100, "optim": {"base_lr": 3e-4, "layer_decay": 0.65}, "model": {"drop_path": 0.1}},
    "vit_large": {"epochs": 50, "optim": {"base_lr": 3e-4, "layer_decay": 0.75, "grad_clip": 1.0},
                  "model": {"drop_path": 0.25}, "deepspeed": "vit_large"},
    "vit_huge": {"epochs": 50, "optim": {"base_lr": 3e-4, "layer_decay": 0.75}, "model": {"drop_path": 0.3},
                 "deepspeed": "vit_huge"},
    "clip_vit_base": {"epochs": 100, "optim": {"lr": 2e-4, "layer_decay": 0.65, "warmup_epochs": 20},
                      "model": {"drop_path": 0.1}},
    "clip_vit_large": {"epochs": 50, "optim": {"lr": 1e-4, "layer_decay": 0.8}, "model": {"drop_path": 0.2},
                       "deepspeed": "vit_large"},
    "clip_vit_huge": {"epochs": 50, "optim": {"lr": 5e-5, "layer_decay": 0.85}, "model": {"drop_path": 0.3},
                      "deepspeed": "vit_huge"},
    # The paper's Table A2: peak lr swept over {0.8, 1.2, 1.6, 2}e-3 at batch 1024 (here 2e-3:
    # base 5e-4), and {1, 2, 3, 4}e-4 for the CLIP recipe (here 2e-4); layer decay 0.75.
    "vit_base_paper": {"epochs": 100, "optim": {"base_lr": 5e-4}, "model": {"drop_path": 0.2}},
    "vit_large_paper": {"epochs": 50, "optim": {"base_lr": 5e-4}, "model": {"drop_path": 0.2}, "deepspeed": "vit_large"},
    "vit_huge_paper": {"epochs": 50, "optim": {"base_lr": 5e-4}, "model": {"drop_path": 0.3}, "deepspeed": "vit_huge"},
    "clip_vit_base_paper": {"epochs": 100, "optim": {"lr": 2e-4}, "model": {"drop_path": 0.1}},
    "clip_vit_large_paper": {"epochs": 50, "optim": {"lr": 2e-4}, "model": {"drop_path": 0.2}, "deepspeed": "vit_large"},
    "clip_vit_huge_paper": {"epochs": 50, "optim": {"lr": 2e-4}, "model": {"drop_path": 0.3}, "deepspeed": "vit_huge"},
}


def recipe_dict(name: str, table: dict[str, dict] = RECIPES, what: str = "recipe") -> dict:
    """A named recipe as a dict, its `base` chain merged in, with its own name as `recipe`."""
    if name not in table:
        raise ConfigError(f"unknown {what} {name!r}; known {what}s: {', '.join(table)}")
    body = copy.deepcopy(table[name])
    base = body.pop("base", None)
    return deep_merge(recipe_dict(base, table, what), {**body, "recipe": name}) if base else {"recipe": name, **body}
