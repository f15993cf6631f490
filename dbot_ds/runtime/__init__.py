"""The runtime: how training runs. Processes and the DeepSpeed engine (the only layer that
imports deepspeed), its config, checkpoints, preemption, metrics, accelerator paths, the
session every training command starts, and the one training loop (trainer.py)."""
