"""The GRPO surrogate and its NAT (Horvitz-Thompson) partial-token estimator.

Inputs are [B, T] tensors aligned on response positions (column t = response token t), with
B responses of full lengths `lengths` (before selection). T may be shorter than max(lengths)
when the forward pass ran on truncated RPC prefixes; positions at or beyond a length, and
unselected positions, are ignored (their values may be garbage, even inf/nan).

Gradient accumulation: a micro-batch returns a SUM (`nat_loss_sum`) and the caller divides
once by the GLOBAL normaliser, the sum of `normaliser_count` over every micro-batch and every
data-parallel rank of the step:
- token-mean:           sum_i sum_{t in S_i} l_it / pi_it                 / N,  N = sum_i T_i
- seq-mean-token-mean:  sum_i (1/T_i) sum_{t in S_i} l_it / pi_it         / B
- seq-mean-token-sum:   sum_i (1/K) sum_{t in S_i} l_it / pi_it           / B
  (K = seq_token_sum_constant, e.g. the generation limit for Dr. GRPO; K = 1 when unset).
N counts every response token BEFORE selection: dividing by the kept count (Hajek) is biased.
pi is a constant; the same weight 1/pi multiplies every per-token term (clip, KL, entropy).

Metrics are self-normalised weighted means over kept tokens, sum_S x/pi / sum_S 1/pi: they
stay in range (clip fraction in [0, 1]) and equal the plain token means under scheme "none".
`weight_sum` lets a caller combine micro-batch metrics exactly (weight each by its weight_sum).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


@dataclass(frozen=True)
class LossConfig:
    """Surrogate settings; validated on construction."""

    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.2  # ratio clipped above at 1 + eps_high
    kl_beta: float = 0.0  # weight of the k3 KL to the reference policy
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * entropy
    aggregation: str = "token-mean"
    seq_token_sum_constant: float | None = None  # K of seq-mean-token-sum (Dr. GRPO)

    def __post_init__(self):
        for name, upper in (("eps_low", 1.0), ("eps_high", math.inf), ("kl_beta", math.inf),
                            ("entropy_coef", math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                    0.0 <= value <= upper and math.isfinite(value)):
                raise ValueError(f"LossConfig.{name}={value!r} must be a finite number in "
                                 f"[0, {upper}]")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"LossConfig.aggregation={self.aggregation!r} is unknown; "
                             f"use one of {AGGREGATIONS}")
        k = self.seq_token_sum_constant
        if k is not None:
            if self.aggregation != "seq-mean-token-sum":
                raise ValueError("LossConfig.seq_token_sum_constant only applies to "
                                 "aggregation='seq-mean-token-sum'; leave it None")
            if isinstance(k, bool) or not isinstance(k, numbers.Real) or not (
                    0.0 < k < math.inf):
                raise ValueError(f"LossConfig.seq_token_sum_constant={k!r} must be a finite "
                                 "number > 0 (e.g. the maximum response length)")


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "std",
                     eps: float = 1e-6) -> Tensor:
    """GRPO advantages (r - group mean) / (group std + eps); scale="none" is Dr. GRPO.

    Responses of one prompt are contiguous in `rewards` [B]. The std is the unbiased one (as
    in TRL and verl). A group of one is its own baseline: its advantage is 0.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not (
            rewards.dtype.is_floating_point):
        raise ValueError("rewards must be a 1-D floating-point tensor [B]")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or (
            rewards.numel() % group_size):
        raise ValueError(f"group_size={group_size!r} must be a positive int dividing the "
                         f"batch size {rewards.numel()}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale={scale!r} must be 'std' (GRPO) or 'none' (Dr. GRPO)")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0")
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale == "std" and group_size > 1:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def normaliser_count(lengths: Tensor, aggregation: str) -> int:
    """This micro-batch's share of the global normaliser: sum of lengths (token-mean) or B."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is unknown; use one of {AGGREGATIONS}")
    return int(lengths.sum()) if aggregation == "token-mean" else int(lengths.numel())


def token_objective(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, cfg: LossConfig,
                    *, ref_logprobs: Tensor | None = None, entropy: Tensor | None = None):
    """Per-token l_it [B, T], plus the ratio, clip indicator and k3 for metrics.

    l = -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) + kl_beta*k3 - entropy_coef*entropy,
    rho = exp(logp - old_logp), k3 = exp(ref - logp) - (ref - logp) - 1.
    Inputs must already be finite everywhere (the callers zero the ignored positions).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    # [B] sequence advantages broadcast over positions; [B, T] per-token ones (OTB) as given.
    adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).to(logprobs.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss = torch.maximum(unclipped, clipped)  # = -min(rho*A, clip(rho)*A)
    k3 = None
    if ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        k3 = torch.exp(delta) - delta - 1.0
        if cfg.kl_beta:
            loss = loss + cfg.kl_beta * k3
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * entropy
    return loss, ratio, clipped > unclipped, k3


def nat_loss_sum(logprobs: Tensor, *, old_logprobs: Tensor, advantages: Tensor,
                 selection_mask: Tensor, selection_prob: Tensor, lengths: Tensor, cfg: LossConfig,
                 ref_logprobs: Tensor | None = None, entropy: Tensor | None = None
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """Horvitz-Thompson loss SUM of one micro-batch and its metrics (module docstring).

    Divide by the global sum of `normaliser_count`. selection_mask/selection_prob come from
    `Selection` (sliced to the width T of logprobs when the forward ran on truncated prefixes).
    """
    _check_inputs(logprobs, old_logprobs, advantages, lengths, cfg, ref_logprobs, entropy)
    if selection_mask.shape != logprobs.shape or selection_mask.dtype != torch.bool:
        raise ValueError(f"selection_mask must be a bool tensor of shape {tuple(logprobs.shape)}")
    if selection_prob.shape != logprobs.shape or not selection_prob.dtype.is_floating_point:
        raise ValueError(f"selection_prob must be a float tensor of shape {tuple(logprobs.shape)}")
    if bool((selection_mask & ~_valid(lengths, logprobs.shape[1])).any()):
        raise ValueError("selection_mask keeps positions at or beyond a response's length; "
                         "build it with selection.sample for these lengths")
    if not bool((selection_prob[selection_mask] > 0).all()):  # also rejects nan
        raise ValueError("selection_prob must be > 0 on every kept position")
    # Constant weights (no grad through pi), computed in the precision pi was given in.
    one = torch.ones((), dtype=selection_prob.dtype, device=selection_prob.device)
    weights = torch.where(selection_mask, one / selection_prob.detach(), 0 * one)
    return _loss_sum(logprobs, old_logprobs, advantages, selection_mask,
                     weights.to(logprobs.dtype), lengths, cfg, ref_logprobs, entropy)


def grpo_loss_sum(logprobs: Tensor, *, old_logprobs: Tensor, advantages: Tensor,
                  lengths: Tensor, cfg: LossConfig, ref_logprobs: Tensor | None = None,
                  entropy: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain full-token GRPO loss SUM (no weights); the reference that scheme "none" matches."""
    _check_inputs(logprobs, old_logprobs, advantages, lengths, cfg, ref_logprobs, entropy)
    return _loss_sum(logprobs, old_logprobs, advantages, _valid(lengths, logprobs.shape[1]),
                     None, lengths, cfg, ref_logprobs, entropy)


def nat_loss(logprobs: Tensor, **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """Single-process convenience: nat_loss_sum / normaliser_count. Returns (loss, metrics)."""
    loss_sum, metrics = nat_loss_sum(logprobs, **kwargs)
    return loss_sum / normaliser_count(kwargs["lengths"], kwargs["cfg"].aggregation), metrics


def grpo_loss(logprobs: Tensor, **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """Single-process convenience: grpo_loss_sum / normaliser_count. Returns (loss, metrics)."""
    loss_sum, metrics = grpo_loss_sum(logprobs, **kwargs)
    return loss_sum / normaliser_count(kwargs["lengths"], kwargs["cfg"].aggregation), metrics


def _loss_sum(logprobs, old_logprobs, advantages, mask, weights, lengths, cfg, ref_logprobs,
              entropy):
    """Shared body: `weights` None means unweighted (the plain GRPO path)."""
    def keep(x):  # ignored positions may hold inf/nan; zeroing them keeps grads finite
        return None if x is None else torch.where(mask, x, torch.zeros_like(x))

    loss, ratio, clipped, k3 = token_objective(
        keep(logprobs), keep(old_logprobs), advantages if advantages.dim() == 1 else keep(advantages), cfg, ref_logprobs=keep(ref_logprobs),
        entropy=keep(entropy))
    if weights is not None:
        loss = loss * weights  # weight exactly 1.0 leaves values and grads bitwise unchanged
    terms = torch.where(mask, loss, torch.zeros_like(loss))
    if cfg.aggregation == "token-mean":
        total = terms.sum()
    elif cfg.aggregation == "seq-mean-token-mean":
        total = (terms.sum(-1) / lengths.to(terms.dtype)).sum()
    elif cfg.seq_token_sum_constant is not None:
        total = (terms.sum(-1) / cfg.seq_token_sum_constant).sum()
    else:
        total = terms.sum()

    with torch.no_grad():
        w = mask.to(logprobs.dtype) if weights is None else weights
        w_sum = w.sum()
        denom = w_sum.clamp(min=torch.finfo(w.dtype).tiny)  # no kept token: metrics read 0

        def mean(x):
            return (torch.where(mask, x, torch.zeros_like(x)) * w).sum() / denom

        metrics = {
            "clip_fraction": mean(clipped.to(w.dtype)),
            "ratio_mean": mean(ratio.detach()),
            "kept_tokens": mask.sum(),
            "weight_sum": w_sum,
        }
        if k3 is not None:
            metrics["kl_mean"] = mean(k3.detach())
        if entropy is not None:
            metrics["entropy_mean"] = mean(keep(entropy).detach())
    return total, metrics


def _valid(lengths, width):
    return torch.arange(width, device=lengths.device)[None] < lengths[:, None]


def _check_inputs(logprobs, old_logprobs, advantages, lengths, cfg, ref_logprobs, entropy):
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"cfg must be a LossConfig, got {type(cfg).__name__}")
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2 or (
            not logprobs.dtype.is_floating_point):
        raise ValueError("logprobs must be a float tensor [B, T] aligned on response positions")
    shape = tuple(logprobs.shape)
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("entropy", entropy)):
        if x is not None and (not isinstance(x, torch.Tensor) or tuple(x.shape) != shape):
            raise ValueError(f"{name} must be a tensor of shape {shape} like logprobs")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(f"advantages must be a tensor of shape ({shape[0]},), one per response, "
                         f"or {shape}, one per response position (OTB)")
    if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != shape[:1] or (
            lengths.dtype.is_floating_point or lengths.dtype == torch.bool):
        raise ValueError(f"lengths must be an integer tensor of shape ({shape[0]},): full "
                         "response lengths before selection")
    if shape[0] and int(lengths.min()) < 1:
        raise ValueError("lengths must all be >= 1")
    if cfg.kl_beta and ref_logprobs is None:
        raise ValueError("LossConfig.kl_beta > 0 needs ref_logprobs; pass them or set kl_beta=0")
    if cfg.entropy_coef and entropy is None:
        raise ValueError("LossConfig.entropy_coef > 0 needs entropy; pass it or set "
                         "entropy_coef=0")
