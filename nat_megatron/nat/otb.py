"""Optimal Token Baseline (OTB, Li et al., arXiv 2602.07078; nat.md section 4).

A per-position baseline for the responses of one prompt group. Inputs are [B, T] tensors
aligned on response positions (column t = response token t, 0-based here; "position t" in
the maths below is 1-based), with the rows of several prompt groups in any order.

Maths. For response i of a group and position t:

    s_it  = 1 - 2 p_it + sum_v p_it,v^2  = ||e_y - softmax(z_it)||^2
    W_it  = sum_{j <= t} s_ij                       (prefix sum over response i's positions)
    B*_t  = sum_i G_it W_it / (sum_i W_it + eps)    (rows of the group that reach t)
    A_it  = (G_it - B*_t) * mask_it

p_it is the probability of the sampled token y = o_it and z_it the logits. s_it, the
logit-gradient proxy, is exactly the squared norm of d log p_y / d z = e_y - p, so W_it is a
forward-only proxy of the squared score norm accumulated along the path; B*_t is the
variance-minimising constant baseline when the gradient variance is weighted that way.
sum_v p^2 = exp(LSE(2z) - 2 LSE(z)) comes from the same vocab-parallel reductions as the
log-prob (see nat_megatron.model.logprobs.vocab_parallel_token_stats, sum_p2=True; under
TP both LSE terms are all-reduced). G_it is the reward-to-go; for outcome rewards it is the
sequence reward on every response position (`outcome_returns`).

Rules that nat.md leaves open, and our choices:
- Zero tail (the OTB paper's reference implementation; on by default here): in a group whose
  longest response is strictly longer than every other, that response's positions beyond the
  second-longest length get baseline 0 (advantage = G there). Without the rule B*_t at those
  positions is G W / (W + eps), i.e. advantage ~0: the tail would get no learning signal.
  Ties for the longest: nothing is zeroed. zero_tail=False disables it. verl offers the same
  rule as `handle_zero_tail`, OFF by default in its single-turn OTB estimator.
- Group of one: the baseline is the return itself, so the advantage is 0 (nat.md). verl
  instead uses no baseline there (advantage = return); we follow nat.md. The zero-tail rule
  does not apply to a group of one.
- eps is added to the denominator (as in verl): where every row's W is 0 (only possible if
  each sampled token had p = 1 so far), B*_t = 0 and A = G.
- The mask must be the FULL response mask (True on t < T_i, a prefix of each row), also under
  NAT truncation: the zero-tail rule needs the full lengths T_i = mask.sum(-1).

NAT rule (how OTB combines with token selection; the trainer implements it):
W_it is a prefix sum, so B*_t only needs every group member's proxy at positions <= t. Under
NAT the trainer therefore computes the proxy, in a forward-only pass (the same pass that
recomputes pi_old with the trainer's weights), for each response i on its prefix up to
min(T_i, t_max(g)), where t_max(g) is the last position any member of group g keeps (RPC: the
largest cut in the group; URS: the largest selected position). Positions beyond that prefix
are given proxy 0: they only change baselines at positions no member keeps, whose advantages
never enter the loss. So W and B* are exact on every kept position (no approximation) for
none/urs/rpc/rpc+urs.
`proxy_prefix_lengths` computes these prefix lengths. Note that a member with nothing kept
(RPC cut 0) still needs its proxy prefix whenever another member of its group keeps
something: its W enters their baselines. For RPC this forward-only pass therefore runs to the
group's largest cut, not to the row's own cut.

Pure torch: nothing here imports Megatron or vLLM.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def logit_gradient_proxy(logprobs: Tensor, sum_p2: Tensor) -> Tensor:
    """Per-token s = 1 - 2 p_y + sum_v p_v^2 = ||e_y - softmax(z)||^2, in fp32.

    logprobs: log p_y of the sampled token; sum_p2: sum_v p_v^2 (both as returned by
    vocab_parallel_token_stats(..., sum_p2=True)), same shape. The result is clamped at 0:
    rounding can take it a few ulps below 0 when p_y ~ 1, and a squared norm is never negative.
    """
    if not isinstance(logprobs, Tensor) or not logprobs.dtype.is_floating_point:
        raise ValueError("logprobs must be a floating-point tensor")
    if not isinstance(sum_p2, Tensor) or not sum_p2.dtype.is_floating_point:
        raise ValueError("sum_p2 must be a floating-point tensor")
    if sum_p2.shape != logprobs.shape:
        raise ValueError(
            f"sum_p2 has shape {tuple(sum_p2.shape)} but logprobs has {tuple(logprobs.shape)}; they must match"
        )
    return (1.0 - 2.0 * logprobs.float().exp() + sum_p2.float()).clamp_min(0.0)


def outcome_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """G_it for outcome rewards: the sequence reward r_i on every response position, 0 elsewhere.

    rewards: float [B]; mask: bool [B, T]. Returns [B, T] in the dtype of rewards.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not (rewards.dtype.is_floating_point):
        raise ValueError("rewards must be a 1-D floating-point tensor [B]")
    if (
        not isinstance(mask, Tensor)
        or mask.dtype != torch.bool
        or mask.dim() != 2
        or (mask.shape[0] != rewards.shape[0])
    ):
        raise ValueError(f"mask must be a bool tensor [B, T] with B = {rewards.shape[0]} (the length of rewards)")
    if mask.device != rewards.device:
        raise ValueError(f"mask is on {mask.device} but rewards on {rewards.device}")
    return torch.where(mask, rewards.unsqueeze(-1), torch.zeros((), dtype=rewards.dtype, device=rewards.device))


def optimal_token_baseline(
    returns: Tensor, proxy: Tensor, mask: Tensor, group_index: Tensor, *, eps: float = 1e-8, zero_tail: bool = True
) -> Tensor:
    """OTB advantages A_it = (G_it - B*_t) * mask_it (module docstring for the maths and rules).

    returns: float [B, T], G_it (e.g. `outcome_returns`).
    proxy: float [B, T], per-token s_it (`logit_gradient_proxy`); W_it = cumsum(s * mask) is
        formed here. Under NAT it may be 0 beyond `proxy_prefix_lengths` (exact on every kept
        position, module docstring).
    mask: bool [B, T], the full response positions (True on t < T_i, a prefix of each row).
    group_index: integer [B], prompt group id per row; groups may be of unequal size and
        their rows need not be contiguous.
    eps: > 0, added to the denominator sum_i W_it.
    zero_tail: apply verl's handle_zero_tail (a strictly longest response gets baseline 0
        beyond the second-longest length).

    Values off the mask are ignored (they may be garbage, even inf/nan); the result is 0
    there. Computed in float64, returned in the dtype of `returns`. No gradient is meant to
    flow: call it under torch.no_grad() or on detached tensors.
    """
    _check_otb_inputs(returns, proxy, mask, group_index, eps, zero_tail)
    B, T = returns.shape
    device = returns.device
    work = torch.float64
    zero = torch.zeros((), dtype=work, device=device)
    g = torch.where(mask, returns.to(work), zero)
    w = torch.where(mask, torch.where(mask, proxy.to(work), zero).cumsum(-1), zero)

    # Dense group ids 0..n_groups-1, whatever the ids and the row order.
    _, inv = torch.unique(group_index, return_inverse=True)
    n_groups = int(inv.max()) + 1 if B else 0
    num = torch.zeros(n_groups, T, dtype=work, device=device).index_add_(0, inv, g * w)
    den = torch.zeros(n_groups, T, dtype=work, device=device).index_add_(0, inv, w)
    baseline = num[inv] / (den[inv] + eps)

    size = torch.bincount(inv, minlength=n_groups)[inv]
    alone = size == 1
    baseline = torch.where(alone.unsqueeze(-1), g, baseline)  # nat.md: own return, A = 0

    if zero_tail:
        lengths = mask.sum(-1)
        longest = torch.zeros(n_groups, dtype=lengths.dtype, device=device).scatter_reduce_(
            0, inv, lengths, "amax"
        )  # lengths >= 0, so the zero start is neutral
        is_longest = lengths == longest[inv]
        n_longest = torch.zeros(n_groups, dtype=lengths.dtype, device=device).index_add_(
            0, inv, is_longest.to(lengths.dtype)
        )
        # Second-longest length = longest among the rows that are not the longest; only used
        # where the longest is unique, so every other row counts.
        second = torch.zeros(n_groups, dtype=lengths.dtype, device=device).scatter_reduce_(
            0, inv, torch.where(is_longest, torch.zeros_like(lengths), lengths), "amax"
        )
        unique = is_longest & (n_longest[inv] == 1) & ~alone
        positions = torch.arange(T, device=device)
        tail = unique.unsqueeze(-1) & (positions >= second[inv].unsqueeze(-1))
        baseline = baseline.masked_fill(tail, 0.0)

    return torch.where(mask, g - baseline, zero).to(returns.dtype)


def proxy_prefix_lengths(lengths: Tensor, last_kept: Tensor, group_index: Tensor) -> Tensor:
    """Per response, how many leading positions need the proxy under NAT: min(T_i, t_max(g)).

    lengths: integer [B], full response lengths T_i.
    last_kept: integer [B], the last kept position of each response, 1-based (0 = nothing
        kept): the RPC cut C_i, or the largest URS-selected position.
    group_index: integer [B], prompt group id per row (as in `optimal_token_baseline`).
    t_max(g) is the largest last_kept in row i's group. Proxies at positions >= the returned
    length may be 0 (or anything): OTB advantages at every kept position stay exact.
    """
    for name, x in (("lengths", lengths), ("last_kept", last_kept), ("group_index", group_index)):
        if not isinstance(x, Tensor) or x.dim() != 1 or not _is_integer(x):
            raise ValueError(f"{name} must be a 1-D integer tensor [B]")
    if last_kept.shape != lengths.shape or group_index.shape != lengths.shape:
        raise ValueError(
            f"lengths {tuple(lengths.shape)}, last_kept {tuple(last_kept.shape)} "
            f"and group_index {tuple(group_index.shape)} must have the same shape"
        )
    if len({lengths.device, last_kept.device, group_index.device}) != 1:
        raise ValueError("lengths, last_kept and group_index must be on the same device")
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0")
    if bool(((last_kept < 0) | (last_kept > lengths)).any()):
        raise ValueError("last_kept must lie in [0, lengths] (1-based last kept position, 0 = nothing kept)")
    if lengths.numel() == 0:
        return lengths.to(torch.long).clone()
    _, inv = torch.unique(group_index, return_inverse=True)
    kept = last_kept.to(torch.long)
    t_max = torch.zeros(int(inv.max()) + 1, dtype=torch.long, device=kept.device)
    t_max = t_max.scatter_reduce_(0, inv, kept, "amax")
    return torch.minimum(lengths.to(torch.long), t_max[inv])


def _is_integer(x: Tensor) -> bool:
    return not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool


def _check_otb_inputs(returns, proxy, mask, group_index, eps, zero_tail) -> None:
    if not isinstance(returns, Tensor) or returns.dim() != 2 or not (returns.dtype.is_floating_point):
        raise ValueError("returns must be a 2-D floating-point tensor [B, T]")
    shape = tuple(returns.shape)
    if not isinstance(proxy, Tensor) or not proxy.dtype.is_floating_point or (tuple(proxy.shape) != shape):
        raise ValueError(f"proxy must be a floating-point tensor of shape {shape} (as returns)")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(f"mask must be a bool tensor of shape {shape} (as returns)")
    if (
        not isinstance(group_index, Tensor)
        or group_index.dim() != 1
        or not (_is_integer(group_index))
        or group_index.shape[0] != shape[0]
    ):
        raise ValueError(f"group_index must be a 1-D integer tensor of length B = {shape[0]}")
    if len({returns.device, proxy.device, mask.device, group_index.device}) != 1:
        raise ValueError("returns, proxy, mask and group_index must be on the same device")
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            "mask must be a prefix in every row (True on t < T_i, then False): "
            "pass the full response mask, not a selection"
        )
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 < eps and math.isfinite(eps)):
        raise ValueError(f"eps={eps!r} must be a finite number > 0")
    if not isinstance(zero_tail, bool):
        raise ValueError(f"zero_tail={zero_tail!r} must be a bool")
