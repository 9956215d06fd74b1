"""The policy model: HF config parsing, the Megatron-Core GPTModel build, per-token log-probs."""
