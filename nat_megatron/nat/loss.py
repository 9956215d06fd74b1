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

Per-token terms, as in verl's core_algos (compared in tests/nat/test_loss.py):
- PPO clip, with optional dual clip (clip_ratio_c = c > 1): for A < 0 the loss is capped at
  -A * c, so a huge ratio on a bad token cannot blow the step up.
- Truncated importance sampling (`tis_weights`, from the trainer: min(pi_old / pi_rollout, C),
  no gradient) multiplies the policy term: it corrects for the rollout engine sampling from a
  slightly different distribution than the trainer's pi_old (bf16 engines, other kernels).
- KL to the reference policy, estimator k1 = log(pi/pi_ref), k2 = (log(pi/pi_ref))^2 / 2, or
  k3 = pi_ref/pi - log(pi_ref/pi) - 1 (verl's low_var_kl: log-ratio clamped to +-20, k3 to
  +-10), weighted by kl_beta.

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
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True)
class LossConfig:
    """Surrogate settings; validated on construction."""

    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.2  # ratio clipped above at 1 + eps_high
    kl_beta: float = 0.0  # weight of the KL to the reference policy
    kl_estimator: str = "k3"  # k1 | k2 | k3 (low_var_kl)
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * entropy
    aggregation: str = "token-mean"
    seq_token_sum_constant: float | None = None  # K of seq-mean-token-sum (Dr. GRPO)
    clip_ratio_c: float | None = None  # dual clip (A < 0): loss <= -A * clip_ratio_c; e.g. 3.0
    tis_cap: float | None = None  # truncated importance sampling: w = min(pi_old/pi_rollout, cap)
    old_logprobs: str = "rollout"  # pi_old: the engine's log-probs, or "recompute"d by the trainer

    def __post_init__(self):
        for name, upper in (
            ("eps_low", 1.0),
            ("eps_high", math.inf),
            ("kl_beta", math.inf),
            ("entropy_coef", math.inf),
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not (0.0 <= value <= upper and math.isfinite(value))
            ):
                raise ValueError(f"LossConfig.{name}={value!r} must be a finite number in [0, {upper}]")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"LossConfig.kl_estimator={self.kl_estimator!r} is unknown; use one of {KL_ESTIMATORS}")
        if self.old_logprobs not in ("rollout", "recompute"):
            raise ValueError(
                f"LossConfig.old_logprobs={self.old_logprobs!r}: use 'rollout' (the "
                "engine's log-probs) or 'recompute' (the trainer's, before the update)"
            )
        for name, low in (("clip_ratio_c", 1.0), ("tis_cap", 0.0)):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real) or not (low < value < math.inf)
            ):
                raise ValueError(f"LossConfig.{name}={value!r} must be a finite number > {low:g}, or None (off)")
        if self.tis_cap is not None and self.old_logprobs != "recompute":
            raise ValueError(
                "LossConfig.tis_cap needs the trainer's own pi_old: set "
                "old_logprobs='recompute' (the weights are pi_old / pi_rollout)"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"LossConfig.aggregation={self.aggregation!r} is unknown; use one of {AGGREGATIONS}")
        k = self.seq_token_sum_constant
        if k is not None:
            if self.aggregation != "seq-mean-token-sum":
                raise ValueError(
                    "LossConfig.seq_token_sum_constant only applies to aggregation='seq-mean-token-sum'; leave it None"
                )
            if isinstance(k, bool) or not isinstance(k, numbers.Real) or not (0.0 < k < math.inf):
                raise ValueError(
                    f"LossConfig.seq_token_sum_constant={k!r} must be a finite "
                    "number > 0 (e.g. the maximum response length)"
                )


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "std", eps: float = 1e-6) -> Tensor:
    """GRPO advantages (r - group mean) / (group std + eps); scale="none" is Dr. GRPO.

    Responses of one prompt are contiguous in `rewards` [B]. The std is the unbiased one (as
    in TRL and verl). A group of one is its own baseline: its advantage is 0.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not (rewards.dtype.is_floating_point):
        raise ValueError("rewards must be a 1-D floating-point tensor [B]")
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size < 1
        or (rewards.numel() % group_size)
    ):
        raise ValueError(f"group_size={group_size!r} must be a positive int dividing the batch size {rewards.numel()}")
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


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled-token log-probs (verl's kl_penalty)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        delta = (-log_ratio).clamp(-20.0, 20.0)
        return (torch.exp(delta) - delta - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"estimator={estimator!r} is unknown; use one of {KL_ESTIMATORS}")


def token_objective(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    cfg: LossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    tis_weights: Tensor | None = None,
):
    """Per-token l_it [B, T], plus the ratio, clip indicator and KL estimate for metrics.

    l = w * pg + kl_beta * kl - entropy_coef * entropy, with pg = -min(rho*A, clip(rho)*A)
    (capped at -A*clip_ratio_c for A < 0 with dual clip), rho = exp(logp - old_logp) and w the
    TIS weights (1 without). Inputs must be finite everywhere (callers zero ignored positions).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    # [B] sequence advantages broadcast over positions; [B, T] per-token ones (OTB) as given.
    adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).to(logprobs.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss = torch.maximum(unclipped, clipped)  # = -min(rho*A, clip(rho)*A)
    if cfg.clip_ratio_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * cfg.clip_ratio_c), loss)
    if tis_weights is not None:
        loss = loss * tis_weights.to(loss.dtype)
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator)
        if cfg.kl_beta:
            loss = loss + cfg.kl_beta * kl
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * entropy
    return loss, ratio, clipped > unclipped, kl


def nat_loss_sum(
    logprobs: Tensor,
    *,
    old_logprobs: Tensor,
    advantages: Tensor,
    selection_mask: Tensor,
    selection_prob: Tensor,
    lengths: Tensor,
    cfg: LossConfig,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    tis_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Horvitz-Thompson loss SUM of one micro-batch and its metrics (module docstring).

    Divide by the global sum of `normaliser_count`. selection_mask/selection_prob come from
    `Selection` (sliced to the width T of logprobs when the forward ran on truncated prefixes).
    """
    _check_inputs(logprobs, old_logprobs, advantages, lengths, cfg, ref_logprobs, entropy, tis_weights)
    if selection_mask.shape != logprobs.shape or selection_mask.dtype != torch.bool:
        raise ValueError(f"selection_mask must be a bool tensor of shape {tuple(logprobs.shape)}")
    if selection_prob.shape != logprobs.shape or not selection_prob.dtype.is_floating_point:
        raise ValueError(f"selection_prob must be a float tensor of shape {tuple(logprobs.shape)}")
    if bool((selection_mask & ~_valid(lengths, logprobs.shape[1])).any()):
        raise ValueError(
            "selection_mask keeps positions at or beyond a response's length; "
            "build it with selection.sample for these lengths"
        )
    if not bool((selection_prob[selection_mask] > 0).all()):  # also rejects nan
        raise ValueError("selection_prob must be > 0 on every kept position")
    # Constant weights (no grad through pi), computed in the precision pi was given in.
    one = torch.ones((), dtype=selection_prob.dtype, device=selection_prob.device)
    weights = torch.where(selection_mask, one / selection_prob.detach(), 0 * one)
    return _loss_sum(
        logprobs,
        old_logprobs,
        advantages,
        selection_mask,
        weights.to(logprobs.dtype),
        lengths,
        cfg,
        ref_logprobs,
        entropy,
        tis_weights,
    )


def grpo_loss_sum(
    logprobs: Tensor,
    *,
    old_logprobs: Tensor,
    advantages: Tensor,
    lengths: Tensor,
    cfg: LossConfig,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    tis_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain full-token GRPO loss SUM (no weights); the reference that scheme "none" matches."""
    _check_inputs(logprobs, old_logprobs, advantages, lengths, cfg, ref_logprobs, entropy, tis_weights)
    return _loss_sum(
        logprobs,
        old_logprobs,
        advantages,
        _valid(lengths, logprobs.shape[1]),
        None,
        lengths,
        cfg,
        ref_logprobs,
        entropy,
        tis_weights,
    )


def nat_loss(logprobs: Tensor, **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """Single-process convenience: nat_loss_sum / normaliser_count. Returns (loss, metrics)."""
    loss_sum, metrics = nat_loss_sum(logprobs, **kwargs)
    return loss_sum / normaliser_count(kwargs["lengths"], kwargs["cfg"].aggregation), metrics


def grpo_loss(logprobs: Tensor, **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """Single-process convenience: grpo_loss_sum / normaliser_count. Returns (loss, metrics)."""
    loss_sum, metrics = grpo_loss_sum(logprobs, **kwargs)
    return loss_sum / normaliser_count(kwargs["lengths"], kwargs["cfg"].aggregation), metrics


def _loss_sum(logprobs, old_logprobs, advantages, mask, weights, lengths, cfg, ref_logprobs, entropy, tis_weights):
    """Shared body: `weights` None means unweighted (the plain GRPO path)."""

    def keep(x):  # ignored positions may hold inf/nan; zeroing them keeps grads finite
        return None if x is None else torch.where(mask, x, torch.zeros_like(x))

    loss, ratio, clipped, kl = token_objective(
        keep(logprobs),
        keep(old_logprobs),
        advantages if advantages.dim() == 1 else keep(advantages),
        cfg,
        ref_logprobs=keep(ref_logprobs),
        entropy=keep(entropy),
        tis_weights=keep(tis_weights),
    )
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
            "clip_low_fraction": mean((clipped & (ratio < 1.0 - cfg.eps_low)).to(w.dtype)),
            "clip_high_fraction": mean((clipped & (ratio > 1.0 + cfg.eps_high)).to(w.dtype)),
            "ratio_mean": mean(ratio.detach()),
            "ratio_max": torch.where(mask, ratio.detach(), torch.zeros_like(ratio)).max()
            if mask.numel()
            else ratio.new_zeros(()),
            "kept_tokens": mask.sum(),
            "weight_sum": w_sum,
        }
        if kl is not None:
            metrics["kl_mean"] = mean(kl.detach())
        if entropy is not None:
            metrics["entropy_mean"] = mean(keep(entropy).detach())
    return total, metrics


def _valid(lengths, width):
    return torch.arange(width, device=lengths.device)[None] < lengths[:, None]


def _check_inputs(logprobs, old_logprobs, advantages, lengths, cfg, ref_logprobs, entropy, tis_weights=None):
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"cfg must be a LossConfig, got {type(cfg).__name__}")
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2 or (not logprobs.dtype.is_floating_point):
        raise ValueError("logprobs must be a float tensor [B, T] aligned on response positions")
    shape = tuple(logprobs.shape)
    for name, x in (
        ("old_logprobs", old_logprobs),
        ("ref_logprobs", ref_logprobs),
        ("entropy", entropy),
        ("tis_weights", tis_weights),
    ):
        if x is not None and (not isinstance(x, torch.Tensor) or tuple(x.shape) != shape):
            raise ValueError(f"{name} must be a tensor of shape {shape} like logprobs")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(
            f"advantages must be a tensor of shape ({shape[0]},), one per response, "
            f"or {shape}, one per response position (OTB)"
        )
    if (
        not isinstance(lengths, torch.Tensor)
        or tuple(lengths.shape) != shape[:1]
        or (lengths.dtype.is_floating_point or lengths.dtype == torch.bool)
    ):
        raise ValueError(
            f"lengths must be an integer tensor of shape ({shape[0]},): full response lengths before selection"
        )
    if shape[0] and int(lengths.min()) < 1:
        raise ValueError("lengths must all be >= 1")
    if cfg.kl_beta and ref_logprobs is None:
        raise ValueError("LossConfig.kl_beta > 0 needs ref_logprobs; pass them or set kl_beta=0")
    if cfg.entropy_coef and entropy is None:
        raise ValueError("LossConfig.entropy_coef > 0 needs entropy; pass it or set entropy_coef=0")
