"""Checkpoints: the HF<->Megatron tensor mapping, conversion, and distributed save/load."""
