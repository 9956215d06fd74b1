"""Selected-position output layer: final norm, vocabulary projection and loss on kept tokens only.

The output layer of a large-vocabulary model is where activation memory goes: the logits and
the log-softmax intermediates are [tokens, V] (V = 152k for Qwen), against [tokens, hidden]
everywhere else. NAT's URS keeps a fraction of the response tokens and RPC drops the prompt
from the loss, so the last pipeline stage gathers the kept positions out of the decoder's
hidden states BEFORE the final norm, and only those run through the norm, the vocab-parallel
output projection, the log-softmax and the loss (and their backward).

`SelectiveGPTModel` is Megatron's GPTModel plus one keyword: `forward(..., output_index=idx)`.
Without it (or on a stage without the output layer) it is GPTModel, unchanged. With it the last
stage returns logits [k, V/tp] for the k positions of `idx`, flat indices into the decoder's
[s, b] token grid in seq-major order (`positions_to_index`), instead of [b, s, V/tp].

Tensor/sequence parallel. Without sequence parallel every TP rank holds the whole sequence:
each selects the same rows, the norm runs replicated (as in Megatron), and the output layer's
own input-gradient all-reduce sums the vocabulary shards' contributions. With sequence
parallel each rank holds s/tp positions: the hidden states are all-gathered (backward: keep
this rank's slice), the kept rows selected, padded to a multiple of tp and split again over TP
(backward: all-gather), so each rank normalises a disjoint k/tp share. That keeps Megatron's
sequence-parallel contract for the final norm's weight (its gradient is summed over TP in
finalize_model_grads, so each token must be counted on one rank only) and the output layer
keeps its own all-gather / reduce-scatter. Padding rows repeat a real position; their logits are
cut off before they are returned, so they carry zero weight. With FP8 (Transformer Engine) the
selected count pads so that each rank's rows meet the recipe's GEMM alignment
(parallel.layout.token_multiple); without it the same path runs in the model dtype.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

from nat_megatron.parallel.layout import Layout, token_multiple


def positions_to_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (seq-major, p * b + i) of the True entries of a [b, s] position mask."""
    return mask.t().reshape(-1).nonzero().squeeze(-1)


def scatter_positions(values: torch.Tensor, index: torch.Tensor, batch: int, seq: int
                      ) -> torch.Tensor:
    """Inverse of indexing with `positions_to_index`: [k, ...] -> [b, s, ...], zeros elsewhere.

    Differentiable in `values` (index_copy), so per-position losses can use the [b, s] layout.
    """
    out = values.new_zeros((seq * batch, *values.shape[1:]))
    out = out.index_copy(0, index, values)
    return out.view(seq, batch, *values.shape[1:]).transpose(0, 1)


def selected_count_multiple(config) -> int:
    """The selected token count pads to this (parallel.layout.token_multiple, selected=True):
    tp under sequence parallel, times the FP8 recipe's alignment under FP8."""
    tp = parallel_state.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1
    layout = Layout(tp=tp, sequence_parallel=tp > 1)
    fp8 = config.fp8_recipe if getattr(config, "fp8", None) else None
    return token_multiple(layout, fp8=fp8, selected=True)


class SelectiveGPTModel(GPTModel):
    """GPTModel whose last stage can run norm + output layer on selected positions only."""

    # (output_index, final norm) while a selected forward runs. A tuple, not attributes: a
    # Module assigned to an attribute would register as a submodule (and enter state dicts).
    _selection: tuple | None = None

    def forward(self, input_ids, position_ids, attention_mask, *args, output_index=None,
                **kwargs):
        norm = self.decoder.final_layernorm
        if output_index is None or not self.post_process or norm is None:
            if output_index is not None and self.post_process and norm is None:
                raise ValueError("output_index needs a model with a final norm on its last "
                                 "stage; build it with build_model")
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        if self.config.mtp_num_layers:
            raise ValueError("output_index does not support multi-token prediction; set "
                             "mtp_num_layers=None or leave output_index unset")
        # The decoder would normalise every position; take its final norm away for this call
        # and apply it in _postprocess to the selected rows only. Restored whatever happens.
        self._selection = (output_index, norm)
        self.decoder.final_layernorm = None
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self.decoder.final_layernorm = norm
            self._selection = None

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self._selection is None or not self.post_process:
            return super()._postprocess(hidden_states, *args, **kwargs)
        index, norm = self._selection
        selected = norm(self._select(hidden_states, index))
        output_weight = None
        if self.share_embeddings_and_output_weights:
            output_weight = self.shared_embedding_or_output_weight()
        logits, _ = self.output_layer(selected, weight=output_weight)
        return logits[: index.numel(), 0]  # drop padding rows: [k, V/tp]

    def _select(self, hidden_states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Hidden states of the selected positions, laid out as the output layer expects.

        Returns [k_pad, 1, h] (or this rank's [k_pad/tp, 1, h] share under sequence parallel).
        """
        sp = self.config.sequence_parallel
        if sp:  # [s/tp, b, h] -> [s, b, h]; backward keeps this rank's slice (split below)
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        s, b, h = hidden_states.shape
        multiple = selected_count_multiple(self.config)
        k = index.numel()
        k_pad = max(multiple, -(-k // multiple) * multiple)
        if k_pad > k:  # repeat a real position: finite values, cut off after the output layer
            fill = index[:1] if k else index.new_zeros(1)
            index = torch.cat([index, fill.expand(k_pad - k)])
        if k and int(index.max()) >= s * b:
            raise ValueError(f"output_index holds position {int(index.max())} but the "
                             f"micro-batch has only {s * b} (s={s}, b={b}) positions")
        rows = hidden_states.reshape(s * b, h).index_select(0, index).unsqueeze(1)
        if sp:  # each TP rank normalises its own k_pad/tp rows; the output layer gathers them
            rows = scatter_to_sequence_parallel_region(rows)
        return rows
