"""Weights on disk: the run directory's layout, stage exports, weight files in other people's
layouts (timm, DINO, MAE, CLIP), one loader of an encoder from any source, and timm exports."""
