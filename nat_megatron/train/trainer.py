"""The RL trainer. One step, top to bottom (Trainer.train_step):

    rollout (every engine its share of the prompts) -> rewards (each sample scored once; + Bingo)
    -> this replica's groups -> NAT selection -> advantages (GRPO, or OTB)
    -> truncated micro-batches -> Megatron forward/backward with the global normaliser
    -> optimizer + LR step -> weight sync into every engine

Every rank holds a part of a colocated vLLM engine (rollout.tp ranks per engine; on GPU it
sleeps while the trainer trains). The samples of a prompt group go whole to one data-parallel
replica (rollout/distribute.py); every rank of the replica draws the same NAT selection for
each sample from (seed, step, sample index). The rollout log-probs are the behaviour policy's
(pi_old in docs/nat.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nat_megatron.checkpoint.dist_ckpt import mark_latest, save_checkpoint
from nat_megatron.checkpoint.hf_io import HFReader, write_hf_export
from nat_megatron.checkpoint.hf_mapping import load_hf_weights
from nat_megatron.checkpoint.lock import hold_checkpoint_dir
from nat_megatron.checkpoint.resume import check_run, resume_checkpoint
from nat_megatron.config import Config
from nat_megatron.data.iterator import DataIterator
from nat_megatron.model.build import attention_backend, build_model
from nat_megatron.nat.loss import group_advantages
from nat_megatron.nat.otb import logit_gradient_proxy, optimal_token_baseline, outcome_returns, proxy_prefix_lengths
from nat_megatron.nat.selection import Selection, sample, selection_generators
from nat_megatron.parallel.distributed import cpu_group, init_distributed, replica_ranks, shutdown
from nat_megatron.parallel.layout import token_multiple
from nat_megatron.rewards.bingo import DynamicLambda, ReferenceLengths, bingo_bonus
from nat_megatron.rewards.passk import mean_and_se, pass_at_k
from nat_megatron.rewards.registry import score_batch
from nat_megatron.rewards.shaping import overlong_penalty
from nat_megatron.rewards.significance import build_scorer, count_significant
from nat_megatron.rollout.distribute import RolloutBatch, StepScores, collect, gather_scores
from nat_megatron.rollout.engine import Engine, SamplingConfig
from nat_megatron.rollout.layout import EngineLayout, choose_groups, request_seed
from nat_megatron.rollout.weight_sync import hf_weight_stream, sync_weights
from nat_megatron.telemetry import Telemetry
from nat_megatron.train.batching import KEPT_FIELD, Sample, build_micro_batches, nat_loss_fn
from nat_megatron.train.forward_backward import forward_backward, is_loss_owner
from nat_megatron.train.optimizer import build_optimizer, build_scheduler, wrap_ddp
from nat_megatron.train.preemption import Preemption
from nat_megatron.train.prompts import held_out_prompts, load_dataset
from nat_megatron.train.token_stats import token_stats

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What the progress line shows of a step (TensorBoard gets every scalar).
PROGRESS_KEYS = (
    "reward/mean",
    "reward/accuracy",
    "loss",
    "grad_norm",
    "nat/kept_fraction",
    "logprob_mismatch/mean",
    "loss/kl_mean",
    "rollout/tokens_per_s",
)


def _repeat(items: list, n: int) -> list:
    """[a, b] -> [a]*n + [b]*n: a group's prompt for each of its responses."""
    return [x for x in items for _ in range(n)]


def _samples(batch: RolloutBatch) -> list[Sample]:
    """The replica's completions as training samples: rollout log-probs are pi_old until the
    trainer recomputes them; advantages come later (Trainer.advantages)."""
    return [
        Sample(
            prompt=torch.tensor(p.prompt_ids),
            response=torch.tensor(c.token_ids, dtype=torch.long),
            old_logprobs=torch.tensor(c.logprobs, dtype=torch.float32),
            advantage=0.0,
        )
        for p, c in zip(_repeat(batch.prompts, batch.group_size), batch.completions)
    ]


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.layout = cfg.parallel.layout()
        if cfg.parallel.share_prompt and attention_backend() != "sdpa":
            raise ValueError(
                "parallel.share_prompt needs the SDPA attention: Transformer Engine's causal attention "
                "(used on this GPU) would ignore the rows' attention mask; set parallel.share_prompt=false"
            )
        # Every padded length: each rank's share whole after the TP/SP/CP split (and FP8-aligned).
        self.seq_multiple = token_multiple(self.layout, fp8=cfg.model.fp8)
        init_distributed(self.layout, seed=cfg.train.seed)
        self.rank = dist.get_rank()
        self.lock = hold_checkpoint_dir(cfg.checkpoint.dir)  # one job per checkpoint.dir
        self.preemption = Preemption()  # SIGTERM/SIGUSR1: finish the step, save, exit (train())
        self.resumed_from = None
        self.hf_dir = self._weights_dir()
        self.arch = cfg.model.arch()
        self.model = self._build_model()
        self.optimizer = build_optimizer(
            self.model,
            lr=cfg.optim.lr,
            min_lr=cfg.optim.min_lr,
            weight_decay=cfg.optim.weight_decay,
            clip_grad=cfg.optim.clip_grad,
            adam_beta1=cfg.optim.adam_beta1,
            adam_beta2=cfg.optim.adam_beta2,
            adam_eps=cfg.optim.adam_eps,
            use_distributed_optimizer=cfg.optim.distributed_optimizer,
            bf16=cfg.model.dtype == "bf16",
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            lr=cfg.optim.lr,
            min_lr=cfg.optim.min_lr,
            warmup_steps=cfg.optim.warmup_steps,
            total_steps=cfg.train.steps,
        )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
        dataset = load_dataset(cfg.data, self.tokenizer, reward=cfg.reward.name)
        if self.rank == 0 and dataset.skipped:
            print(dataset.report(), flush=True)
        self.data = DataIterator(dataset.examples, batch_size=cfg.train.prompts_per_step, seed=cfg.train.seed)
        self.prompt_key = {ex.uid: i for i, ex in enumerate(dataset.examples)}
        self.data_fingerprint = dataset.fingerprint()
        self.eval_prompts = None
        if cfg.eval.enabled:
            self.eval_prompts = held_out_prompts(cfg, self.tokenizer)
        self.step, self.skipped_in_a_row = 0, 0
        self.eval_start = None  # per-problem pass@1 before the first step (the gain's reference)
        bingo = cfg.reward.bingo
        self.bingo_lambda = DynamicLambda.from_config(bingo) if bingo.enabled else None
        self._resume()
        # Rollout: this rank's engine, and which replica trains what (rollout/layout.py).
        r = cfg.rollout
        self.sampling = SamplingConfig(
            temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, n=r.group_size
        )
        self.engines = EngineLayout(world=dist.get_world_size(), tp=r.tp)
        self.replica_of = [None] * dist.get_world_size()
        dist.all_gather_object(self.replica_of, parallel_state.get_data_parallel_rank(), group=cpu_group())
        self.engine = self._build_engine()
        # The reference policy: a frozen copy of the initial weights, sharded like the policy.
        need_ref = cfg.loss.kl_beta > 0 or (bingo.enabled and bingo.scorer == "reference_proxy")
        self.ref_model = self._build_model(wrap=False) if need_ref else None
        if bingo.enabled:  # the engines still hold the reference (initial) weights here
            self.scorer = build_scorer(bingo.scorer, bingo.scorer_path)
            self.ref_lengths = self._reference_lengths()
        if self.step > 0:  # the engines start from the HF weights: bring them to the checkpoint
            self.sync()
        self.telemetry = Telemetry(
            cfg.telemetry, total_steps=cfg.train.steps, start_step=self.step, progress_keys=PROGRESS_KEYS
        )

    # ----------------------------------------------------------------- set-up
    def _weights_dir(self) -> Path:
        path = None
        if self.rank == 0:  # one rank converts/caches a packaged model; the others wait
            path = self.cfg.model.weights_dir()
        dist.barrier()
        path = path or self.cfg.model.weights_dir()
        if path is None:
            raise ValueError(
                "model: the RL trainer needs weights: set model.hf_dir (or a preset "
                "that ships weights, e.g. smollm2-135m-instruct)"
            )
        return Path(path)

    def _build_model(self, wrap: bool = True) -> list:
        """The policy (wrapped for the distributed optimizer), or with wrap=False a frozen copy
        of the initial weights: the reference policy."""
        from nat_megatron.model.recompute import RECOMPUTE  # the one recompute -> Megatron mapping

        chunks = build_model(
            self.arch,
            self.layout,
            dtype=DTYPES[self.cfg.model.dtype],
            fp8=self.cfg.model.fp8,
            **RECOMPUTE[self.cfg.parallel.recompute],
        )
        load_hf_weights(chunks, self.arch, HFReader(self.hf_dir))
        if not wrap:
            for chunk in chunks:
                chunk.requires_grad_(False).eval()
            return chunks
        return wrap_ddp(chunks, use_distributed_optimizer=self.cfg.optim.distributed_optimizer)

    def _build_engine(self) -> Engine:
        """This rank's part of its rollout engine (every rank is in one; rollout/engine.py)."""
        from nat_megatron.rollout.engine import RolloutEngine

        r = self.cfg.rollout
        return RolloutEngine(
            str(self.hf_dir),
            tp=r.tp,
            dtype={"fp32": "float32", "bf16": "bfloat16"}[r.dtype],
            max_model_len=self.cfg.data.max_prompt_tokens + r.max_new_tokens,
            gpu_memory_utilization=r.gpu_memory_utilization,
            kv_cache_gb=r.kv_cache_gb,
            seed=self.cfg.train.seed,
            enforce_eager=r.enforce_eager,
            log_file=self._vllm_log(),
        )

    def _vllm_log(self) -> str | None:
        """vLLM's chatter goes to <run>/logs/vllm.rank<r>.log (the run: checkpoint.dir's parent),
        or to the console with --verbose."""
        if os.environ.get("NAT_MEGATRON_VERBOSE") == "1":
            return None
        return str(Path(self.cfg.checkpoint.dir).parent / "logs" / f"vllm.rank{self.rank}.log")

    # ------------------------------------------------------------ the RL step
    def generate(
        self, prompts, *, step: int, sampling: SamplingConfig | None = None, offset: int = 0
    ) -> tuple[range, list]:
        """This rank's engine samples its share of `prompts` (rollout/layout.py), each prompt
        with its own seed (from its index + offset in the step): a resumed run samples exactly
        what the uninterrupted one did. Returns (the share's indices, their groups)."""
        share = self.engines.prompt_share(self.engines.engine_of(self.rank), len(prompts))
        seeds = [request_seed(self.cfg.train.seed, step, offset + i) for i in share]
        return share, self.engine.generate(
            [list(prompts[i].prompt_ids) for i in share], sampling or self.sampling, seeds
        )

    def rollout(self, prompts) -> tuple[dict, list, StepScores, list[int], dict]:
        """Sample and score the step's groups; with rollout.filter_groups (DAPO's dynamic
        sampling) drop the groups whose rewards are all equal (no GRPO signal) and, up to
        rollout.max_resample times, sample more prompts until prompts_per_step groups are left.

        Returns this engine's groups by prompt index, every prompt sampled, their scores (after
        reward.overlong_* shaping), the indices of the groups to train on, and metrics. Filtering
        looks at the reward before the Bingo bonus. At least one group per data-parallel replica
        is kept (uninformative ones fill up, with zero advantage), so every replica trains.
        """
        r = self.cfg.rollout
        mine, every, scores, rounds, generate_s = {}, [], None, 0, 0.0
        while True:
            offset = len(every)
            every += prompts
            t0 = time.perf_counter()
            share, groups = self.generate(prompts, step=self.step, offset=offset)
            dist.barrier(group=cpu_group())  # every engine done: the generation's wall time
            generate_s += time.perf_counter() - t0
            mine.update({offset + i: g for i, g in zip(share, groups)})
            more = gather_scores(
                groups,
                share,
                len(prompts),
                layout=self.engines,
                group=cpu_group(),
                score=lambda idx, comps, every=every, offset=offset: self.score(
                    every, [offset + i for i in idx], comps
                ),
            )
            more.rewards = more.rewards + overlong_penalty(
                more.lengths,
                max_len=r.max_new_tokens,
                buffer=self.cfg.reward.overlong_buffer,
                penalty=self.cfg.reward.overlong_penalty,
            )
            scores = more if scores is None else scores + more
            need = self.cfg.train.prompts_per_step
            if not r.filter_groups or int(scores.informative().sum()) >= need or rounds >= r.max_resample:
                break
            rounds += 1
            prompts = self.data.next_batch()
        keep = list(range(len(every)))
        metrics = {"rollout/generate_s": generate_s}
        if r.filter_groups:
            useful = scores.informative()
            keep = choose_groups(useful.tolist(), need, self.layout.dp)
            metrics.update(
                {
                    "rollout/informative_groups": int(useful.sum()),
                    "rollout/resample_rounds": rounds,
                    "rollout/trained_groups": len(keep),
                }
            )
        return mine, every, scores, keep, metrics

    def score(self, prompts, prompt_indices: list[int], completions: list) -> list:
        """(reward, correct, status) of each completion against its prompt's reference answer."""
        if not completions:  # batch_decode([]) returns one empty text
            return []
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        scores = score_batch(
            self.cfg.reward.name, texts, [prompts[i].answer for i in prompt_indices], timeout=self.cfg.reward.timeout
        )
        return [(float(r), bool(c), st) for r, c, st in zip(scores.rewards, scores.correct, scores.statuses)]

    def train_step(self) -> dict:
        """One RL step: rollouts of this step's prompts, the policy update on them, the weight sync."""
        self.telemetry.start_step()
        batch, metrics = self.rollout_step()
        selection, updates, learn_metrics = self.learn(batch)
        metrics.update(learn_metrics)
        with self.telemetry.phase("sync"):
            sync = self.sync()
        self.step += 1
        return self.step_metrics(batch, selection, updates, sync, metrics)

    def rollout_step(self) -> tuple[RolloutBatch, dict]:
        """Generate and score the step's groups, then gather on this replica the groups it trains."""
        tel = self.telemetry
        prompts = self.data.next_batch()
        with tel.phase("rollout"):  # generation and scoring (each sample once, spread over ranks)
            mine, every, scores, keep, metrics = self.rollout(prompts)
            self.engine.sleep()  # GPU memory to the trainer until the weight sync
        with tel.phase("route"):  # each group to the replica that trains it
            batch = collect(
                mine,
                every,
                keep,
                scores,
                layout=self.engines,
                replicas=self.layout.dp,
                replica_of=self.replica_of,
                group=cpu_group(),
            )
        if self.cfg.reward.bingo.enabled:
            with tel.phase("reward"):
                bonus, bingo_metrics = self.bingo_bonus(batch)
                batch.rewards = batch.rewards + bonus
                metrics.update(bingo_metrics)
        return batch, metrics

    def learn(self, batch: RolloutBatch) -> tuple[Selection, list[dict], dict]:
        """The policy update on this replica's groups: NAT selection, advantages, the loss's other
        inputs, then train.epochs passes over train.mini_batches optimizer steps. Returns the
        selection, each optimizer step's figures (update()) and the phase's metrics."""
        cfg, tel = self.cfg, self.telemetry
        samples = _samples(batch)
        selection = self.select(batch)
        with tel.phase("advantage"):
            samples, adv_metrics = self.advantages(batch, samples, selection)
        with tel.phase("logprobs"):
            samples, input_metrics = self.policy_inputs(samples, selection)
        with tel.phase("train"):
            updates = [
                self.update(samples, selection, part)
                for _ in range(cfg.train.epochs)
                for part in torch.arange(len(samples)).tensor_split(cfg.train.mini_batches)
            ]
            self.scheduler.step(increment=1)  # the LR schedule counts RL steps
        return selection, updates, {**adv_metrics, **input_metrics}

    def step_metrics(
        self, batch: RolloutBatch, selection: Selection, updates: list[dict], sync: dict, metrics: dict
    ) -> dict:
        """The step's scalars, the same on every rank (sums over replicas where needed)."""
        cfg = self.cfg
        n_tokens = int(batch.step_lengths.sum())
        n_rewards, r_sum, r_sq, w_sum, w_kept = self._over_replicas(
            len(batch.rewards),
            float(batch.rewards.sum()),
            float(batch.rewards.square().sum()),
            float(selection.weights.sum()),
            selection.kept_tokens,
        )
        w_max = self._max_over_ranks(selection.weight_max)
        r_mean = r_sum / max(n_rewards, 1)
        r_std = math.sqrt(max(r_sq - n_rewards * r_mean**2, 0.0) / max(n_rewards - 1, 1))
        first = updates[0]  # its weights are the rollout's: the engine-vs-trainer gap is meaningful
        metrics.setdefault("logprob_mismatch/mean", first["mismatch"][0])
        metrics.setdefault("logprob_mismatch/max", first["mismatch"][1])
        kept, forward = (sum(u["tokens"][i] for u in updates[: cfg.train.mini_batches]) for i in (0, 1))
        return {
            "reward/mean": r_mean,
            "reward/std": r_std,
            "reward/accuracy": float(batch.step_correct.float().mean()),
            **{f"reward/status_{k}": v for k, v in sorted(batch.status.items())},
            "response/length_mean": n_tokens / max(batch.step_lengths.numel(), 1),
            "nat/kept_fraction": kept / max(n_tokens, 1),
            "nat/weight_max": w_max,
            "nat/weight_mean": w_sum / max(w_kept, 1),
            "loss": sum(u["loss"] for u in updates) / len(updates),
            "grad_norm": sum(u["grad_norm"] for u in updates) / len(updates),
            **{
                f"loss/{k}": sum(u["metrics"][k] for u in updates) / len(updates)
                for k in first["metrics"]
                if k != "ratio_max"
            },
            "loss/ratio_max": max(u["metrics"]["ratio_max"] for u in updates),
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens/generated": n_tokens,
            "tokens/kept": kept,
            "tokens/forward": forward,
            "rollout/tokens_per_s": n_tokens / max(metrics["rollout/generate_s"], 1e-9),
            "sync/gb": sync["bytes"] / 1024**3,
            **metrics,
        }

    def policy_inputs(self, samples: list[Sample], selection: Selection) -> tuple[list[Sample], dict]:
        """What the loss needs beyond the rollout, on the kept positions only (forward-only passes
        over the same truncated prefixes as the policy's): the reference policy's log-probs (KL
        term), and with loss.old_logprobs=recompute the trainer's own pi_old, from which the
        truncated importance weights min(pi_old / pi_rollout, loss.tis_cap) follow. Returns the
        samples with those fields, and their metrics."""
        loss = self.cfg.loss
        keep = selection.mask
        metrics = {}
        if loss.kl_beta > 0:
            ref = self.forward_stats(self.ref_model, samples, keep)["logprobs"]
            samples = [
                dataclasses.replace(s, ref_logprobs=ref[j, : len(s.response)].clone()) for j, s in enumerate(samples)
            ]
        if loss.old_logprobs == "recompute":
            old = self.forward_stats(self.model, samples, keep)["logprobs"]
            rollout = torch.zeros_like(old)
            for j, s in enumerate(samples):
                rollout[j, : len(s.old_logprobs)] = s.old_logprobs
            log_w = (old - rollout)[keep]
            n, gap_sum = self._over_replicas(log_w.numel(), float(log_w.abs().sum()))
            metrics["logprob_mismatch/mean"] = gap_sum / max(n, 1)
            metrics["logprob_mismatch/max"] = self._max_over_ranks(float(log_w.abs().max()) if n else 0.0)
            tis = None
            if loss.tis_cap is not None:
                w = torch.exp(old - rollout)
                tis = torch.where(keep, w.clamp(max=loss.tis_cap), torch.ones_like(w))
                _, w_sum, capped = self._over_replicas(n, float(tis[keep].sum()), int((w[keep] > loss.tis_cap).sum()))
                metrics.update(
                    {
                        "tis/weight_mean": w_sum / max(n, 1),
                        "tis/capped_fraction": capped / max(n, 1),
                        "tis/weight_max": self._max_over_ranks(float(tis[keep].max()) if keep.any() else 1.0),
                    }
                )
            samples = [
                dataclasses.replace(
                    s,
                    old_logprobs=torch.where(keep[j, : len(s.response)], old[j, : len(s.response)], s.old_logprobs),
                    tis_weights=None if tis is None else tis[j, : len(s.response)].clone(),
                )
                for j, s in enumerate(samples)
            ]
        return samples, metrics

    def update(self, samples: list[Sample], selection: Selection, part: torch.Tensor) -> dict:
        """One optimizer step on the mini-batch `part` of this replica's samples. Its normaliser
        is its own (the full lengths of its samples over all replicas), as in the peers."""
        cfg = self.cfg
        mine = [samples[i] for i in part.tolist()]
        sel = Selection(
            mask=selection.mask[part],
            prob=selection.prob[part],
            cut=selection.cut[part],
            lengths=selection.lengths[part],
        )
        micro_batches = build_micro_batches(
            mine, sel, aggregation=cfg.loss.aggregation, **self._micro_batching(len(mine))
        )
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outs = forward_backward(
            self.model,
            micro_batches,
            nat_loss_fn(cfg.loss),
            vocab_size=self.arch.vocab_size,
            output_mask=KEPT_FIELD,
            entropy=cfg.loss.entropy_coef > 0,
            temperature=cfg.rollout.temperature,
        )
        out = self._reduce_last_stage(outs)
        grad_norm = float("nan")
        finite = math.isfinite(out["loss"])
        if finite:
            # Megatron's fp32 optimizer steps on non-finite grads without checking: look at
            # the global grad norm first (prepare_grads is idempotent; step() repeats it).
            self.optimizer.prepare_grads()
            grad_norm = float(self.optimizer.get_grad_norm())
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self._count_skip(finite, out["loss"], grad_norm)
        return {**out, "grad_norm": grad_norm}

    def forward_stats(self, model: list, samples: list[Sample], keep: torch.Tensor, **kwargs) -> dict:
        """Forward-only per-token statistics of `model` at the `keep` positions (token_stats.py),
        of the distribution the engines sample from (logits / rollout.temperature)."""
        return token_stats(
            model,
            samples,
            keep,
            vocab_size=self.arch.vocab_size,
            layout=self.layout,
            micro_batching=self._micro_batching(len(samples)),
            temperature=self.cfg.rollout.temperature,
            **kwargs,
        )

    def _micro_batching(self, n: int) -> dict:
        """build_micro_batches' grouping options for n samples (parallel.*): by a token budget,
        or micro_batch_size sequences each; lengths padded to the layout's (and FP8's) multiple."""
        p = self.cfg.parallel
        size = (
            {"max_tokens": p.max_tokens_per_micro_batch}
            if p.max_tokens_per_micro_batch
            else {"num_micro_batches": -(-n // p.micro_batch_size)}
        )
        return {
            "seq_multiple": self.seq_multiple,
            "pad_rows": self.layout.vpp is not None,
            "share_prompt": p.share_prompt,
            **size,
        }

    def select(self, batch: RolloutBatch) -> Selection:
        """The NAT selection of this replica's samples, drawn from (seed, step, step-wide sample
        index): the same on every rank that holds a sample, whatever the layout."""
        nat, G = self.cfg.nat, batch.group_size
        lengths = torch.tensor([len(c.token_ids) for c in batch.completions])
        ids = [p_index * G + k for p_index in batch.prompt_index for k in range(G)]
        gens = selection_generators(self.cfg.train.seed, self.step, ids)
        return sample(nat.scheme, nat.budget, lengths, gens, **nat.options())

    def advantages(self, batch: RolloutBatch, samples: list[Sample], selection: Selection) -> tuple[list[Sample], dict]:
        """GRPO: one group-normalised advantage per response. OTB (nat/otb.py): one per token.

        Groups are whole on a replica, so both are computed from this replica's samples. OTB's
        baseline needs every group member's logit-gradient proxy on the positions any member
        keeps (nat/otb.py, "NAT rule"): one forward-only pass of the policy over those prefixes.
        The behaviour log-probs stay the engine's. Returns the samples with their advantages,
        and metrics.
        """
        if self.cfg.advantage.estimator == "grpo":
            adv = group_advantages(batch.rewards, batch.group_size, scale=self.cfg.advantage.scale)
            return [dataclasses.replace(s, advantage=float(a)) for s, a in zip(samples, adv)], {}
        lengths, group = selection.lengths, batch.group_index
        kept = selection.mask
        last_kept = (kept * torch.arange(1, kept.shape[1] + 1)).amax(1)
        prefix = proxy_prefix_lengths(lengths, last_kept, group)
        stats = self.forward_stats(
            self.model, samples, torch.arange(kept.shape[1])[None] < prefix[:, None], sum_p2=True
        )
        pos = torch.arange(stats["logprobs"].shape[1])[None]
        mask = pos < lengths[:, None]
        proxy = torch.where(pos < prefix[:, None], logit_gradient_proxy(stats["logprobs"], stats["sum_p2"]), 0.0)
        adv = optimal_token_baseline(outcome_returns(batch.rewards, mask), proxy, mask, group)
        proxy_tokens, abs_sum, n_valid = self._over_replicas(
            int(prefix.sum()), float(adv.abs()[mask].sum()), int(mask.sum())
        )
        metrics = {"otb/proxy_tokens": int(proxy_tokens), "otb/advantage_abs_mean": abs_sum / max(n_valid, 1)}
        samples = [dataclasses.replace(s, advantage=adv[j, : len(s.response)].clone()) for j, s in enumerate(samples)]
        return samples, metrics

    def bingo_bonus(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """Bingo's significance-aware length reward (rewards/bingo.py) for this replica's samples,
        and its metrics."""
        b = self.cfg.reward.bingo
        ref_lps = None
        if self.ref_model is not None:  # the reference policy's log-probs of every response
            samples = _samples(batch)
            lengths = torch.tensor([len(s.response) for s in samples])
            everything = torch.arange(max(int(lengths.max()), 1))[None] < lengths[:, None]
            lp = self.forward_stats(self.ref_model, samples, everything)["logprobs"]
            ref_lps = [lp[j, :n] for j, n in enumerate(lengths.tolist())]
        texts = self.tokenizer.batch_decode([c.token_ids for c in batch.completions], skip_special_tokens=True)
        keep = self.scorer.keep_probs(texts, [c.token_ids for c in batch.completions], ref_lps)
        n_sig, n_insig = count_significant(keep, b.threshold)
        keys = [self.prompt_key[p.uid] for p in _repeat(batch.prompts, batch.group_size)]
        ref_sig, ref_insig = self.ref_lengths.get(keys)
        accuracy = float(batch.step_correct.float().mean())
        lam = self.bingo_lambda.update(self.step + 1, accuracy)
        bonus = bingo_bonus(
            batch.correct,
            n_sig,
            n_insig,
            ref_sig,
            ref_insig,
            lambda_c=b.lambda_c,
            lambda_wn=b.lambda_wn,
            lambda_we=b.lambda_we,
            lambda_we_prime=lam,
        )
        n, bonus_sum, sig_sum, insig_sum, corr_sum = self._over_replicas(
            len(bonus), float(bonus.sum()), float(n_sig.sum()), float(n_insig.sum()), float(batch.rewards.sum())
        )
        return bonus, {
            "bingo/bonus_mean": bonus_sum / max(n, 1),
            "bingo/lambda_we_prime": lam,
            "bingo/significant_mean": sig_sum / max(n, 1),
            "bingo/insignificant_mean": insig_sum / max(n, 1),
            "reward/correctness_mean": corr_sum / max(n, 1),
        }

    def _reference_lengths(self) -> ReferenceLengths:
        """Significant / insignificant token counts of the reference model's response to every
        prompt this run will see, measured once (one sampled response per prompt, spread over
        the engines) while the engines hold the initial weights, kept in checkpoint.dir."""
        path = Path(self.cfg.checkpoint.dir) / "bingo_reference.json"
        ahead = copy.deepcopy(self.data)  # the prompts of the remaining steps, in order
        prompts = {}
        for _ in range(self.step, self.cfg.train.steps):
            for p in ahead.next_batch():
                prompts[self.prompt_key[p.uid]] = p
        ref = ReferenceLengths.load(path) if path.is_file() else ReferenceLengths()
        dist.barrier(group=cpu_group())  # everyone has read the file before rank 0 rewrites it
        missing = ref.missing(list(prompts))
        if not missing:
            return ref
        if self.rank == 0:
            print(f"bingo: reference responses for {len(missing)} prompts", flush=True)
        todo = [prompts[k] for k in missing]
        share, groups = self.generate(todo, step=-1, sampling=dataclasses.replace(self.sampling, n=1))
        outs = [g[0] for g in groups]
        counts = []
        if self.rank == self.engines.ranks(self.engines.engine_of(self.rank))[0]:
            texts = self.tokenizer.batch_decode([c.token_ids for c in outs], skip_special_tokens=True)
            # The engine's sampled log-probs are the reference policy's (initial weights).
            keep = self.scorer.keep_probs(texts, [c.token_ids for c in outs], [torch.tensor(c.logprobs) for c in outs])
            n_sig, n_insig = count_significant(keep, self.cfg.reward.bingo.threshold)
            counts = [(missing[i], s, n) for i, s, n in zip(share, n_sig.tolist(), n_insig.tolist())]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, counts, group=cpu_group())
        for part in gathered:
            for k, s, n in part:
                ref.add(k, s, n)
        if self.rank == 0:
            ref.save(path)
        return ref

    def sync(self) -> dict:
        """The trainer's weights into every engine (woken for it on GPU); seconds and bytes."""
        self.engine.wake_up(["weights"])
        out = sync_weights(
            self.model, self.arch, self.engine, bucket_bytes=int(self.cfg.rollout.sync_bucket_mb * 1024**2)
        )
        self.engine.wake_up(["kv_cache"])
        return out

    def _over_replicas(self, *values) -> list[float]:
        """Sums over data-parallel replicas of per-replica numbers (each replica counted once,
        by its first rank), on every rank."""
        lead = self.rank == replica_ranks()[0]
        t = torch.tensor([float(v) if lead else 0.0 for v in values], dtype=torch.float64)
        dist.all_reduce(t, group=cpu_group())
        return t.tolist()

    @staticmethod
    def _max_over_ranks(value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group())
        return float(t)

    def _reduce_last_stage(self, outs) -> dict:
        """The update's numbers on all ranks: "loss" (sum / global normaliser), "mismatch" (mean
        and max |rollout - trainer| log-prob over kept tokens; the engine holds the trainer's
        weights at the first update), "tokens" (kept, fed forward) and the loss's own
        "metrics" (nat/loss.py), combined over micro-batches and ranks by their HT weight sums.
        """
        # The same names on every rank (stages without the loss have no outputs).
        means = ["clip_fraction", "clip_high_fraction", "clip_low_fraction", "ratio_mean"]
        means += ["kl_mean"] if self.cfg.loss.kl_beta > 0 else []
        means += ["entropy_mean"] if self.cfg.loss.entropy_coef > 0 else []
        # loss_sum, count, |diff| sum, kept, forward, weight_sum, then weighted metric sums
        s = torch.zeros(6 + len(means), dtype=torch.float64)
        peak = torch.zeros(2, dtype=torch.float64)  # max |diff|, max ratio
        if is_loss_owner():
            for o in outs:
                s[0] += float(o["loss_sum"])
                s[1] += float(o["count"])
                mb = o["micro_batch"]  # this rank's positions of the micro-batch
                kept = mb.fields[KEPT_FIELD]
                diff = (o["stats"]["logprobs"].cpu() - mb.fields["old_logprobs"]).abs()[kept]
                s[2] += float(diff.sum())
                s[3] += diff.numel()
                s[4] += int((mb.fields["response_pos"] > 0).sum())  # response tokens fed forward
                m = o["metrics"]
                w = float(m["weight_sum"])
                s[5] += w
                for k, name in enumerate(means):
                    s[6 + k] += float(m[name]) * w
                peak[0] = max(float(peak[0]), float(diff.max()) if diff.numel() else 0.0)
                if int(m["kept_tokens"]):
                    peak[1] = max(float(peak[1]), float(m["ratio_max"]))
        dist.all_reduce(s, group=cpu_group())
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=cpu_group())
        metrics = {name: float(s[6 + k] / s[5].clamp(min=1e-30)) for k, name in enumerate(means)}
        metrics["ratio_max"] = float(peak[1])
        return {
            "loss": float(s[0] / s[1].clamp(min=1)),
            "mismatch": (float(s[2] / s[3].clamp(min=1)), float(peak[0])),
            "tokens": (int(s[3]), int(s[4])),
            "metrics": metrics,
        }

    def _count_skip(self, finite: bool, loss: float, grad_norm) -> None:
        """NaN/inf loss or grad norm: skip this update, go on; too many in a row stop the run."""
        if finite:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        if self.rank == 0:
            print(f"step {self.step + 1}: non-finite loss {loss} / grad norm {grad_norm}: update skipped", flush=True)
        if self.skipped_in_a_row >= self.cfg.train.max_skipped_steps:
            raise RuntimeError(
                f"{self.skipped_in_a_row} steps in a row had a non-finite loss or "
                "gradient (train.max_skipped_steps); lower optim.lr or check the data"
            )

    # ----------------------------------------------------------- checkpoints
    def save(self) -> None:
        root = Path(self.cfg.checkpoint.dir)
        name = f"step_{self.step:06d}"
        extra = {
            "step": self.step,
            "data": self.data.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "skipped_in_a_row": self.skipped_in_a_row,
            "eval_start": self.eval_start,
            "bingo_lambda": self.bingo_lambda.state_dict() if self.bingo_lambda else None,
        }
        meta = {"step": self.step, "config": self.cfg.to_dict(), "data_fingerprint": self.data_fingerprint}
        save_checkpoint(root / name, self.model, optimizer=self.optimizer, extra=extra, meta=meta)
        if self.rank == 0:
            mark_latest(root, name, keep_last=self.cfg.checkpoint.keep_last, protect=(self.resumed_from,))
        dist.barrier()

    def _resume(self) -> None:
        """Load the newest checkpoint that verifies (checkpoint/resume.py) and belongs to this run."""
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return
        found = resume_checkpoint(
            self.cfg.checkpoint.dir,
            None if resume == "auto" else resume,
            self.model,
            optimizer=self.optimizer,
            check=lambda path, meta: check_run(
                path, meta, config=self.cfg.to_dict(), fingerprint=self.data_fingerprint
            ),
        )
        if found is None:
            return
        path, extra = found
        self.resumed_from = path
        self.step, self.skipped_in_a_row = extra["step"], extra.get("skipped_in_a_row", 0)
        self.data.load_state_dict(extra["data"], allow_changed=self.cfg.data.allow_changed)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.eval_start = extra.get("eval_start")
        if self.bingo_lambda is not None and extra.get("bingo_lambda"):
            self.bingo_lambda.load_state_dict(extra["bingo_lambda"])
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def export_hf(self, out: str | Path) -> None:
        """Write the current weights as a Hugging Face directory (rank 0 writes; all ranks send),
        into a temporary directory renamed into place when complete."""
        write_hf_export(
            out, hf_weight_stream(self.model, self.arch, to=0), source_dir=self.hf_dir, write=self.rank == 0
        )
        dist.barrier()

    def evaluate(self) -> dict:
        """Held-out accuracy of the engines' current weights (eval.*): every engine samples its
        share of the prompts, each sample is scored once, every rank gets the figures."""
        e, r = self.cfg.eval, self.cfg.rollout
        k = e.samples_per_prompt
        sampling = dataclasses.replace(self.sampling, n=k, temperature=r.temperature if k > 1 else 0.0)
        prompts = self.eval_prompts
        start = time.perf_counter()
        share, groups = self.generate(prompts, step=-2, sampling=sampling)
        scores = gather_scores(
            groups,
            share,
            len(prompts),
            layout=self.engines,
            group=cpu_group(),
            score=lambda idx, comps: self.score(prompts, idx, comps),
        )
        correct = scores.correct.view(len(prompts), k).sum(1).tolist()
        out = {
            "eval/prompts": len(prompts),
            "eval/seconds": time.perf_counter() - start,
            "eval/response_length_mean": float(scores.lengths.float().mean()),
        }
        for kk in sorted({1, k}):
            mean, se = mean_and_se([pass_at_k(k, c, kk) for c in correct])
            out[f"eval/pass@{kk}"], out[f"eval/pass@{kk}_se"] = mean, se
        # The gain over the evaluation before the first step, paired by problem (the same
        # problems both times), whose standard error is what says whether the model learned.
        pass1 = [pass_at_k(k, c, 1) for c in correct]
        if self.step == 0:
            self.eval_start = pass1
        elif self.eval_start is not None and len(self.eval_start) == len(pass1):
            gain, se = mean_and_se([a - b for a, b in zip(pass1, self.eval_start)])
            out["eval/pass@1_gain"], out["eval/pass@1_gain_se"] = gain, se
        return out

    def log_eval(self, scalars: dict) -> None:
        k = self.cfg.eval.samples_per_prompt
        how = "greedy" if k == 1 else f"{k} samples at T={self.cfg.rollout.temperature}"
        line = (
            f"eval after step {self.step}: pass@1 {scalars['eval/pass@1']:.4f} +- "
            f"{scalars['eval/pass@1_se']:.4f}"
            + (f", pass@{k} {scalars[f'eval/pass@{k}']:.4f} +- {scalars[f'eval/pass@{k}_se']:.4f}" if k > 1 else "")
            + f" ({int(scalars['eval/prompts'])} prompts, {how}, {scalars['eval/seconds']:.0f}s)"
        )
        if "eval/pass@1_gain" in scalars:
            gain, se = scalars["eval/pass@1_gain"], scalars["eval/pass@1_gain_se"]
            line += f"; pass@1 gain since step 0 {gain:+.4f} +- {se:.4f} (paired, {gain / max(se, 1e-12):.1f} SE)"
        self.telemetry.log_scalars(self.step, scalars, line)

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        every, ev = self.cfg.checkpoint.every, self.cfg.eval
        if ev.at_start and self.step == 0:
            self.log_eval(self.evaluate())
        while self.step < self.cfg.train.steps:
            scalars = self.train_step()
            self.telemetry.log_step(self.step, scalars)
            last = self.step == self.cfg.train.steps
            stop = self.preemption.requested() and not last  # the same on all ranks
            if not stop and ((ev.every and self.step % ev.every == 0) or (ev.at_end and last)):
                self.log_eval(self.evaluate())  # skipped when stopping: the save comes first
            if self.step % every == 0 or last or stop:
                self.save()
            if stop:
                self.preemption.exit(self.step)
        if self.cfg.checkpoint.export_dir() is not None:
            self.export_hf(self.cfg.checkpoint.export_dir())

    def close(self) -> None:
        self.telemetry.close()
        if self.engine is not None:
            self.engine.close()
        if self.lock is not None:
            self.lock.release()
        shutdown()


def run(cfg: Config) -> None:
    """Train `cfg` to the end (resuming from its checkpoint directory when one exists)."""
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
