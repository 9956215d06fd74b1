"""One forward/backward pass over a list of micro-batches, through Megatron's real schedules.

The loss is never averaged inside Megatron. Each micro-batch returns the SUM of its weighted
per-token terms and its share of the global normaliser (nat.md §1); Megatron's
`calculate_per_token_loss` path adds the shares over micro-batches and data/context-parallel
ranks and divides every gradient once by the total, in `finalize_model_grads`.

Micro-batches may differ in length (RPC truncation). Without interleaving,
`variable_seq_lengths` makes every pipeline p2p send the tensor shape first, so each stage
learns a micro-batch's length before it receives the activations. Megatron's interleaved
schedule cannot do that with pp=2 (a stage's previous and next peer are the same rank, and its
combined shape exchange matches messages by posting order, crossing them): with virtual
pipeline stages every micro-batch of a step is padded to the step's longest one, and every
stage uses that one fixed shape (build.py turns the shape exchange off). The interleaved
schedule also runs micro-batches in groups of pp per model chunk, so their number is rounded
up to a multiple of pp with zero-weight micro-batches (their outputs are dropped): a rank
whose DP share is small, or whose empty responses were dropped, still runs. Both rules live
here, next to the schedule that needs them, so every caller (trainer, token statistics, the
tuner's validation) gets them.

`output_mask` names a bool per-position field: the last stage then runs the final norm, the
output layer and the log-softmax on those positions only (model/output.py), and the loss sees
statistics scattered back onto the [b, s] grid, zero at the other positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from nat_megatron.model.layers import cp_chunk_positions, segment_attention_mask
from nat_megatron.model.logprobs import vocab_parallel_token_stats
from nat_megatron.model.output import positions_to_index, scatter_positions
from nat_megatron.parallel.layout import Layout, token_multiple

# loss_fn(stats, micro_batch) -> (loss_sum, normaliser_count[, metrics]). `stats` holds
# per-position [b, s] "logprobs" (and "entropy" / "sum_p2" when requested) for this rank's
# positions; `metrics` (optional) are reported back per micro-batch as out["metrics"].
LossFn = Callable[[dict, "MicroBatch"], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class MicroBatch:
    """Padded token batch; every per-position tensor is [b, s] aligned with `tokens`.

    `targets[:, t]` is the token whose log-prob position t predicts (tokens[:, t+1]).
    `fields` carries whatever the loss needs per position (advantages, old log-probs, HT
    weights, ...). `count` is this micro-batch's share of the global loss normaliser.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def pad_to(self, length: int) -> MicroBatch:
        """Right-pad every tensor with zeros; padded positions carry zero weight in every loss."""
        extra = length - self.seq_len
        if extra == 0:
            return self
        pad = lambda t: torch.nn.functional.pad(t, (0, extra))  # noqa: E731
        return MicroBatch(
            tokens=pad(self.tokens),
            targets=pad(self.targets),
            fields={k: pad(v) for k, v in self.fields.items()},
            count=self.count,
        )

    def zero_weight(self) -> MicroBatch:
        """A micro-batch of this shape that changes nothing: zero tokens, fields and count."""
        zero = torch.zeros_like
        return MicroBatch(
            tokens=zero(self.tokens),
            targets=zero(self.targets),
            fields={k: zero(v) for k, v in self.fields.items()},
            count=0,
        )

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def for_cp_rank(self) -> MicroBatch:
        """This context-parallel rank's positions (Megatron's load-balanced 2*cp split)."""
        cp = parallel_state.get_context_parallel_world_size()
        if cp == 1:
            return self
        rank = parallel_state.get_context_parallel_rank()
        if self.seq_len % (2 * cp):
            raise ValueError(f"micro-batch length {self.seq_len} is not a multiple of 2*cp={2 * cp}")
        idx = cp_chunk_positions(self.seq_len // cp, rank, cp, self.tokens.device)
        return MicroBatch(
            tokens=self.tokens[:, idx],
            targets=self.targets[:, idx],
            fields={k: v[:, idx] for k, v in self.fields.items()},
            # The normaliser is counted once per sample: on CP rank 0 only.
            count=self.count if rank == 0 else 0,
        )

    def position_ids(self) -> torch.Tensor:
        if "position_ids" in self.fields:  # shared-prompt rows (batching.py) carry their own
            return self.fields["position_ids"]
        cp = parallel_state.get_context_parallel_world_size()
        s = self.seq_len
        if cp == 1:
            pos = torch.arange(s, device=self.tokens.device)
        else:  # the sliced micro-batch: recover global positions
            pos = cp_chunk_positions(s, parallel_state.get_context_parallel_rank(), cp, self.tokens.device)
        return pos.unsqueeze(0).expand(self.tokens.shape[0], -1)


def is_loss_owner() -> bool:
    """This rank reports its positions' loss statistics: last pipeline stage, TP rank 0 (the
    other TP ranks hold the same numbers; each CP rank holds its own positions)."""
    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def _device(t: torch.Tensor) -> torch.Tensor:
    return t.cuda(non_blocking=True) if torch.cuda.is_available() else t


def _check_fp8_lengths(chunks: list, micro_batches: list[MicroBatch]) -> None:
    """Under FP8 a length that leaves a rank's share unaligned fails deep inside Transformer
    Engine; name the rule and the fix instead."""
    config = getattr(chunks[0], "config", None)
    if not getattr(config, "fp8", None):
        return
    layout = Layout(
        tp=config.tensor_model_parallel_size,
        cp=config.context_parallel_size,
        sequence_parallel=config.sequence_parallel,
    )
    multiple = token_multiple(layout, fp8=config.fp8_recipe)
    bad = sorted({mb.seq_len for mb in micro_batches if mb.seq_len % multiple})
    if bad:
        raise ValueError(
            f"micro-batch lengths {bad} are not multiples of {multiple}, which FP8 "
            f"({config.fp8_recipe}) needs for every rank's share of the tokens; "
            "build them with seq_multiple=token_multiple(layout, fp8=recipe)"
        )


def forward_backward(
    chunks: list,
    micro_batches: list[MicroBatch],
    loss_fn: LossFn,
    *,
    vocab_size: int,
    forward_only: bool = False,
    entropy: bool = False,
    sum_p2: bool = False,
    keep_logits: bool = False,
    output_mask: str | None = None,
    temperature: float = 1.0,
) -> list[dict]:
    """Run Megatron's schedule (no pipelining, 1F1B or interleaved) over `micro_batches`.

    Returns, on the last pipeline stage, one dict per micro-batch with the detached
    "loss_sum" and "count", the per-position "stats" and the loss's "metrics", and the
    "micro_batch" they describe as this rank holds it (padded to one length under
    interleaving, sliced to this CP rank's positions); an empty list elsewhere. Exactly one
    rank of each (pipeline-last) TP group reports the statistics: `is_loss_owner()`.
    Gradients accumulate in the DDP buffers and are divided by the global count when the model
    is wrapped by `wrap_ddp` and the schedule is run with forward_only=False. `keep_logits`
    adds the full-vocabulary logits (gathered over TP; for checks and debugging, not for
    training) as "logits".
    `output_mask`: name of a bool [b, s] field of every micro-batch; only those positions reach
    the output layer and the loss (zeros elsewhere in "stats" and "logits").
    `temperature`: the statistics are those of softmax(logits / temperature), the distribution
    the rollout engines sample from (the engines report log-probs of that same distribution).
    """
    _check_fp8_lengths(chunks, micro_batches)
    given = len(micro_batches)
    if len(chunks) > 1:  # interleaved schedule: one shape and whole groups of pp (see above)
        longest = max(mb.seq_len for mb in micro_batches)
        micro_batches = [mb.pad_to(longest) for mb in micro_batches]
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        micro_batches += [micro_batches[-1].zero_weight()] * (-given % pp)
    local = [mb.for_cp_rank() for mb in micro_batches]

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        tokens, positions = _device(mb.tokens), _device(mb.position_ids())
        mask, extra = None, {}
        if "segment" in mb.fields:  # shared-prompt rows: their own mask and rotary positions
            mask, extra = _device(segment_attention_mask(mb.fields["segment"])), {"rope_positions": positions}
        if output_mask is None:
            return model(tokens, positions, mask, **extra), partial(_loss, mb, None)
        index = _device(positions_to_index(mb.fields[output_mask]))
        output = model(tokens, positions, mask, output_index=index, **extra)
        return output, partial(_loss, mb, index)

    def _loss(mb: MicroBatch, index: torch.Tensor | None, logits: torch.Tensor):
        targets = _device(mb.targets)
        if index is not None:  # logits are [k, V/tp] at the selected positions
            targets = targets.t().reshape(-1)[index]
        scaled = logits if temperature == 1.0 else logits / temperature
        stats = vocab_parallel_token_stats(scaled, targets, vocab_size, entropy=entropy, sum_p2=sum_p2)
        if index is not None:
            b, s = mb.tokens.shape
            stats = {k: scatter_positions(v, index, b, s) for k, v in stats.items()}
        loss_sum, count, *metrics = loss_fn(stats, mb)
        count = torch.as_tensor(count, dtype=torch.int, device=loss_sum.device)
        out = {
            "loss_sum": loss_sum.detach().clone(),
            "count": count.clone(),
            "stats": {k: v.detach() for k, v in stats.items()},
            "metrics": {k: v.detach() for k, v in (metrics[0] if metrics else {}).items()},
            "micro_batch": mb,  # the positions "stats" describe: this rank's (padded, CP-sliced)
        }
        if keep_logits:
            full = gather_from_tensor_model_parallel_region(logits.detach())[..., :vocab_size]
            out["logits"] = full if index is None else scatter_positions(full, index, *mb.tokens.shape)
        return loss_sum, count, out

    n_chunks = len(chunks)
    if n_chunks > 1:  # interleaved schedule: one iterator per virtual stage, same data
        data = [iter(local) for _ in range(n_chunks)]
    else:
        data = iter(local)
    schedule = get_forward_backward_func()
    outs = schedule(
        forward_step_func=forward_step,
        data_iterator=data,
        model=chunks if n_chunks > 1 else chunks[0],
        num_microbatches=len(local),
        # The whole sequence's length: the schedules divide it by cp (and by tp under sequence
        # parallel) themselves to size the p2p buffers. A CP-local length here would be cut
        # twice (s / cp^2) under the interleaved schedule, which uses this fixed shape.
        seq_length=max(mb.seq_len for mb in micro_batches),
        micro_batch_size=local[0].tokens.shape[0],
        forward_only=forward_only,
    )
    return outs[:given]
