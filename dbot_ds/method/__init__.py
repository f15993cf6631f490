"""The method: what dBOT computes, with no knowledge of DeepSpeed, Slurm or files on disk.

Masking, losses, the student and the teacher (around the architectures of models/), the
stages' arithmetic, the teacher policies (how a teacher evolves), the tasks (what a micro-step
computes: distillation or classification), the fine-tuning classifier and the FLOP model."""
