"""dbot-ds: dBOT (masked knowledge distillation with bootstrapped teachers) on DeepSpeed."""

__version__ = "0.1.0"
