"""Training: micro-batched forward/backward through Megatron's schedules, DDP and the optimizer."""
