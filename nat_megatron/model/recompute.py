"""Activation recompute options (parallel.recompute) and what each sets in Megatron-Core's
TransformerConfig: the one mapping, passed to build_model as overrides (`**RECOMPUTE[name]`)
by the trainer and the layout tuner, whose memory model (tune/memory.py) follows it.
"""

RECOMPUTE = {
    "none": {},
    # MLP recompute: the dense MLP's internals (5f per token) are recomputed in the backward;
    # core_attn is not listed because flash/fused attention keeps no [s, s] scores anyway.
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["mlp"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}
