"""NAT maths: token selection with exact inclusion probabilities, and the Horvitz-Thompson
GRPO loss. Pure torch: nothing here imports Megatron or vLLM."""
