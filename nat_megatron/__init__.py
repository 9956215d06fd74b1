"""nat_megatron: a Megatron-Core GRPO trainer with NAT token subsampling."""

import warnings

# Megatron-Core warns at import about optional CUDA extensions (Apex, TE) that are absent on
# CPU machines and optional on GPU ones; the fallbacks it names are the ones we rely on.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")
warnings.filterwarnings("ignore", message="full scope is deprecated")
