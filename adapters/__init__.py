"""Merged adapters (GRACE, LoRA/AdaLoRA, T-Patcher, WISE): the `adapter` strategy (issue 5)."""
