"""Selected-position output layer: final norm, vocabulary projection and loss on kept tokens only.

The output layer of a large-vocabulary model is where activation memory goes: the logits and
the log-softmax intermediates are [tokens, V] (V = 152k for Qwen), against [tokens, hidden]
everywhere else. NAT's URS keeps a fraction of the response tokens and RPC drops the prompt
from the loss, so the last pipeline stage gathers the kept positions out of the decoder's
hidden states BEFORE the final norm, and only those run through the norm, the vocab-parallel
output projection, the log-softmax and the loss (and their backward). The stage's last
transformer layer goes further (nat.md §2, URS): its keys and values still come from every
position, but its attention (queries), output projection, residual and MLP run on the kept
positions only (`selected_last_layer`, layers.selected_query_attention), with Transformer
Engine's linears on GPU and our local spec on CPU, under TP, SP, PP and CP alike.

`SelectiveGPTModel` is Megatron's GPTModel plus two keywords: `forward(..., output_index=idx)`
(below) and `rope_positions` [b, s]: the rotary position of every token, for rows whose positions
do not count 0, 1, 2, ... (shared-prompt rows, train/batching.py; cp=1), where GPTModel itself
rotates token t by position t.
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

import contextlib

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

from nat_megatron.model.layers import check_no_cp_for_masks, selected_query_attention
from nat_megatron.parallel.layout import Layout, token_multiple


def positions_to_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (seq-major, p * b + i) of the True entries of a [b, s] position mask."""
    return mask.t().reshape(-1).nonzero().squeeze(-1)


def scatter_positions(values: torch.Tensor, index: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
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
    """GPTModel whose last stage can run its last layer, norm and output layer on selected
    positions only."""

    # (output_index, final norm, last layer or None) while a selected forward runs. A tuple,
    # not attributes: a Module assigned to an attribute would register as a submodule.
    _selection: tuple | None = None
    # False: the last layer runs on every position and only the final norm and output layer
    # on the selected ones (tools/bench_nat.py measures what the last layer adds).
    select_last_layer: bool = True

    _rope_positions: torch.Tensor | None = None

    def forward(self, input_ids, position_ids, attention_mask, *args, output_index=None, rope_positions=None, **kwargs):
        self._rope_positions = rope_positions
        try:
            return self._forward(input_ids, position_ids, attention_mask, *args, output_index=output_index, **kwargs)
        finally:
            self._rope_positions = None

    def _preprocess(self, *args, **kwargs):
        out = super()._preprocess(*args, **kwargs)
        if self._rope_positions is None or out[1] is None:
            return out
        check_no_cp_for_masks()
        positions = self._rope_positions
        table = self.rotary_pos_emb(int(positions.max()) + 1)  # [S, 1, 1, d] for positions 0..S-1
        return (out[0], table[:, 0][positions.t()], *out[2:])  # [s, b, 1, d]: each token's own

    def _forward(self, input_ids, position_ids, attention_mask, *args, output_index=None, **kwargs):
        decoder = self.decoder
        norm = decoder.final_layernorm
        if output_index is None or not self.post_process or norm is None:
            if output_index is not None and self.post_process and norm is None:
                raise ValueError(
                    "output_index needs a model with a final norm on its last stage; build it with build_model"
                )
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        if self.config.mtp_num_layers:
            raise ValueError(
                "output_index does not support multi-token prediction; set "
                "mtp_num_layers=None or leave output_index unset"
            )
        # The decoder runs every layer but the last, without its final norm; _postprocess runs
        # the last layer, the norm and the output layer on the selected rows. The layer list
        # is shortened (not the layer bypassed) so that full-layer recompute, which replays
        # ranges of layer numbers, replays the same layers. Restored whatever happens.
        layers = decoder.layers
        # Uniform full recompute replays ranges of recompute_num_layers layers; with more than
        # one per range a range could reach the removed last layer: keep it in the decoder.
        ranges = self.config.recompute_granularity == "full" and (self.config.recompute_num_layers or 1) > 1
        last = layers[-1] if len(layers) and self.select_last_layer and not ranges else None
        self._selection = (output_index, norm, last)
        decoder.final_layernorm = None
        if last is not None:
            decoder.layers = torch.nn.ModuleList(list(layers)[:-1])
            decoder.num_layers_per_pipeline_rank -= 1
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            if last is not None:
                decoder.layers = layers
                decoder.num_layers_per_pipeline_rank += 1
            decoder.final_layernorm = norm
            self._selection = None

    def _postprocess(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
        if self._selection is None or not self.post_process:
            return super()._postprocess(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
        index, norm, last = self._selection
        k = index.numel()
        index = self._pad_index(index, hidden_states)
        if last is None:
            rows = self._select(hidden_states, index)
        else:
            mask = kwargs.get("attention_mask")
            rows = selected_last_layer(last, hidden_states, index, rotary_pos_emb, self._select, attention_mask=mask)
        selected = norm(rows)
        output_weight = None
        if self.share_embeddings_and_output_weights:
            output_weight = self.shared_embedding_or_output_weight()
        logits, _ = self.output_layer(selected, weight=output_weight)
        return logits[:k, 0]  # drop padding rows: [k, V/tp]

    def _pad_index(self, index: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """`index` padded to selected_count_multiple by repeating a real position (finite
        values, cut off after the output layer); checked against the [s, b] grid."""
        s, b = hidden_states.shape[:2]
        if self.config.sequence_parallel:
            s *= parallel_state.get_tensor_model_parallel_world_size()
        multiple = selected_count_multiple(self.config)
        k = index.numel()
        k_pad = max(multiple, -(-k // multiple) * multiple)
        if k and int(index.max()) >= s * b:
            raise ValueError(
                f"output_index holds position {int(index.max())} but the "
                f"micro-batch has only {s * b} (s={s}, b={b}) positions"
            )
        if k_pad > k:
            fill = index[:1] if k else index.new_zeros(1)
            index = torch.cat([index, fill.expand(k_pad - k)])
        return index

    def _select(self, hidden_states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (padded) of [s, b, h] hidden states, laid out as the output layer
        expects: [k_pad, 1, h], or this rank's [k_pad/tp, 1, h] share under sequence parallel
        (the decoder's [s/tp, b, h] is all-gathered; backward keeps this rank's slice)."""
        sp = self.config.sequence_parallel
        if sp:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        s, b, h = hidden_states.shape
        rows = hidden_states.reshape(s * b, h).index_select(0, index).unsqueeze(1)
        if sp:  # each TP rank normalises its own k_pad/tp rows; the output layer gathers them
            rows = scatter_to_sequence_parallel_region(rows)
        return rows


def selected_last_layer(
    layer, hidden_states: torch.Tensor, index: torch.Tensor, rotary_pos_emb, select, *, attention_mask=None
) -> torch.Tensor:
    """A transformer layer (pre-norm attention + MLP, Megatron's TransformerLayer with our
    spec's modules) whose outputs are needed at the positions `index` only.

    Keys and values come from every position: the input norm and the QKV projection run on the
    whole sequence (one GEMM; its query columns of the other positions are the only waste).
    Attention runs for the selected queries only (layers.selected_query_attention, also over
    CP), then the output projection, the residual, the MLP norm and the MLP on the selected
    rows. Returns [k_pad, 1, h] (this rank's [k_pad/tp, 1, h] under sequence parallel: the
    row-parallel projection reduce-scatters along the rows, as `select` splits the residual).
    """
    config, attn = layer.config, layer.self_attention
    context = contextlib.nullcontext()
    if config.fp8:  # the block's FP8 autocast does not cover a layer run from here
        from megatron.core.fp8_utils import get_fp8_context

        context = get_fp8_context(config, layer.layer_number - 1)
    with context:
        query, key, value = attn.get_query_key_value_tensors(layer.input_layernorm(hidden_states), None)
        if rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            cp_group = parallel_state.get_context_parallel_group() if config.context_parallel_size > 1 else None
            query = apply_rotary_pos_emb(query, q_emb, config=config, cp_group=cp_group)
            key = apply_rotary_pos_emb(key, k_emb, config=config, cp_group=cp_group)
        scale = config.softmax_scale or query.shape[-1] ** -0.5
        context_rows = selected_query_attention(query, key, value, index, scale=scale, attention_mask=attention_mask)
        out, bias = attn.linear_proj(context_rows.unsqueeze(1))
        h = select(hidden_states, index) + (out if bias is None else out + bias)
        out, bias = layer.mlp(layer.pre_mlp_layernorm(h))
        return h + (out if bias is None else out + bias)
