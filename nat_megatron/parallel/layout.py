"""Parallel layouts and the rules that make one valid: one place for every layout check.

The model builder, the trainer's dry run and the layout tuner all call `validate_layout`, so a
layout is rejected for the same reason, with the same message, everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Layout:
    """How a model is split over ranks: tensor (tp), pipeline (pp, vpp), context (cp), data (dp)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: int | None = None  # virtual (interleaved) pipeline chunks per stage
    sequence_parallel: bool = False

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "dp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"layout {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.vpp is not None:
            if self.vpp < 1:
                raise ValueError(f"layout vpp must be >= 1 or unset, got {self.vpp}")
            if self.pp < 2:
                raise ValueError("layout vpp (interleaved pipeline) needs pp >= 2; unset vpp or raise pp")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError("layout sequence_parallel needs tp >= 2; set sequence_parallel=false")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def seq_multiple(self) -> int:
        """Every sequence length fed to the model must be a multiple of this (without FP8)."""
        return token_multiple(self)

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Parse 'tp=2,pp=2,cp=1,dp=1[,vpp=2][,sp=1]'."""
        keys = {
            "tp": "tp",
            "pp": "pp",
            "cp": "cp",
            "dp": "dp",
            "vpp": "vpp",
            "sp": "sequence_parallel",
            "sequence_parallel": "sequence_parallel",
        }
        kwargs = {}
        for part in filter(None, text.split(",")):
            key, _, val = part.partition("=")
            if key.strip() not in keys or not val:
                raise ValueError(f"layout item {part!r}: expected key=value with key in {sorted(keys)}")
            field = keys[key.strip()]
            kwargs[field] = val.strip().lower() in ("1", "true", "yes") if field == "sequence_parallel" else int(val)
        return cls(**kwargs)


# Token-dimension alignment of Transformer Engine's FP8 GEMMs per Megatron-Core fp8_recipe,
# as megatron.core.fp8_utils.get_fp8_align_size (MXFP8 scales blocks of 32 along the tokens
# too). The recipes a config may name (model.fp8); "custom" needs a quantizer factory.
FP8_ALIGN = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}


def token_multiple(layout: Layout, *, fp8: str | None = None, selected: bool = False) -> int:
    """What a token count must be a multiple of so that every rank's share is valid.

    The one place for this rule: sequence lengths (batching, the trainer, the tuner) and the
    selected-token count of the output path (model/output.py) both come from here.

    Sequence lengths: Megatron's CP load balancing cuts a sequence into 2*cp chunks, and
    sequence parallelism splits each rank's s/cp positions over tp. With FP8 every rank's own
    share, s/cp (s/(cp*tp) under SP, the part a rank quantises before TE's FP8 all-gather) must
    be a multiple of the recipe's GEMM alignment; checking only the global length would let
    s=16 through at cp=2 with 8 tokens per rank.
    Selected counts (selected=True): a CP rank selects among its own positions, and under SP
    the selected rows are split over tp, so each rank's k/tp rows are aligned with FP8.
    """
    t = layout.tp if layout.sequence_parallel else 1
    base, split = (t, t) if selected else ((2 * layout.cp if layout.cp > 1 else 1) * t, layout.cp * t)
    if fp8 is None:
        return base
    if fp8 not in FP8_ALIGN:
        raise ValueError(f"fp8 recipe {fp8!r} is unknown; use one of {tuple(FP8_ALIGN)} or None")
    return math.lcm(base, split * FP8_ALIGN[fp8])


class ModelShape(Protocol):
    """What the layout rules read of a model (model/arch.py's ModelArch has it)."""

    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    num_layers: int


def validate_layout(
    arch: ModelShape,
    layout: Layout,
    *,
    world_size: int | None = None,
    seq_len: int | None = None,
    gpus_per_node: int | None = None,
    global_batch: int | None = None,
    micro_batch_size: int = 1,
) -> None:
    """Raise ValueError naming the first rule the layout breaks for this model.

    Optional checks: gpus_per_node (tensor parallelism stays inside a node, on NVLink),
    global_batch / micro_batch_size (see _check_batch: only what cannot run) and seq_len (an
    exact length that is fed unpadded, e.g. a conversion check; the trainer pads its own).
    """
    tp, pp = layout.tp, layout.pp
    if world_size is not None and world_size != layout.world_size:
        raise ValueError(
            f"layout tp*pp*cp*dp = {tp}*{pp}*{layout.cp}*{layout.dp} = {layout.world_size} "
            f"does not match the world size {world_size}; change dp (or tp/pp/cp) to fit"
        )
    if gpus_per_node is not None and (tp > gpus_per_node or gpus_per_node % tp):
        raise ValueError(
            f"tp={tp} must divide the {gpus_per_node} GPUs per node: tensor parallelism "
            "communicates every layer and must stay on one node's NVLink"
        )
    if arch.num_heads % tp:
        raise ValueError(f"tp={tp} does not divide num_attention_heads={arch.num_heads}")
    if arch.num_kv_heads % tp:
        raise ValueError(
            f"tp={tp} does not divide the number of query groups (num_key_value_heads="
            f"{arch.num_kv_heads}); use a tp that divides it"
        )
    if arch.ffn_hidden_size % tp:
        raise ValueError(f"tp={tp} does not divide intermediate_size={arch.ffn_hidden_size}")
    chunks = pp * (layout.vpp or 1)
    if arch.num_layers % chunks:
        raise ValueError(
            f"pp={pp} x vpp={layout.vpp or 1} = {chunks} pipeline chunks do not divide num_layers={arch.num_layers}"
        )
    if global_batch is not None:
        _check_batch(layout, global_batch, micro_batch_size)
    if seq_len is not None and seq_len % layout.seq_multiple:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of {layout.seq_multiple} "
            f"(2*cp{'*tp with sequence parallel' if layout.sequence_parallel else ''}); pad it"
        )


def _check_batch(layout: Layout, global_batch: int, micro_batch_size: int) -> None:
    """Only what cannot run. A global batch that dp * micro_batch_size does not divide still
    runs: DP ranks take uneven shares (a rank may get none: batching.build_micro_batches gives
    it one zero-weight row), and the interleaved schedule's whole groups of pp micro-batches
    are met by zero-weight micro-batches (train/forward_backward.py)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if global_batch < 1:
        raise ValueError(f"global batch {global_batch} must be >= 1 sequence")


def micro_batches_per_rank(layout: Layout, global_batch: int, micro_batch_size: int) -> int:
    """Micro-batches the schedule runs per step on the most loaded DP rank: its share of the
    batch in micro-batches, rounded up to whole groups of pp under the interleaved schedule."""
    share = -(-global_batch // layout.dp)
    m = max(1, -(-share // micro_batch_size))
    return -(-m // layout.pp) * layout.pp if layout.vpp is not None else m
