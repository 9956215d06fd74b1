"""The RL trainer. One step, top to bottom (Trainer.train_step):

    rollout -> rewards (+ Bingo length reward) -> advantages (GRPO, or OTB) -> NAT selection
    -> truncated micro-batches -> Megatron forward/backward with the global normaliser
    -> optimizer + LR step -> weight sync into the rollout engine

Rank 0 owns the colocated vLLM engine and samples for the whole batch; every rank receives the
samples, takes its data-parallel share, and draws the same NAT selection for each sample from
(seed, step, sample id). The rollout log-probs are the behaviour policy's (pi_old in nat.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nat_megatron.checkpoint.dist_ckpt import latest_checkpoint, load_checkpoint, mark_latest, save_checkpoint
from nat_megatron.checkpoint.hf_io import HFReader, HFWriter, copy_tokenizer_files
from nat_megatron.checkpoint.hf_mapping import load_hf_weights
from nat_megatron.config import Config
from nat_megatron.data.dataset import load_dataset
from nat_megatron.data.iterator import DataIterator
from nat_megatron.model.build import build_model
from nat_megatron.nat.loss import group_advantages
from nat_megatron.nat.otb import logit_gradient_proxy, optimal_token_baseline, outcome_returns, proxy_prefix_lengths
from nat_megatron.nat.selection import Selection, sample, selection_generators
from nat_megatron.parallel.distributed import init_distributed, shutdown
from nat_megatron.rewards.bingo import DynamicLambda, ReferenceLengths, bingo_bonus
from nat_megatron.rewards.registry import score_batch
from nat_megatron.rewards.significance import build_scorer, count_significant
from nat_megatron.rollout.weight_sync import hf_weight_stream, sync_weights
from nat_megatron.telemetry import Telemetry
from nat_megatron.train.batching import KEPT_FIELD, Sample, build_micro_batches, nat_loss_fn
from nat_megatron.train.forward_backward import forward_backward
from nat_megatron.train.optimizer import build_optimizer, build_scheduler, wrap_ddp
from nat_megatron.train.token_stats import token_stats

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.layout = cfg.parallel.layout()
        init_distributed(self.layout, seed=cfg.train.seed)
        self.rank = dist.get_rank()
        self.hf_dir = self._weights_dir()
        self.arch = cfg.model.arch()
        self.model = self._build_model()
        self.optimizer = build_optimizer(
            self.model, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, weight_decay=cfg.optim.weight_decay,
            clip_grad=cfg.optim.clip_grad, adam_beta1=cfg.optim.adam_beta1,
            adam_beta2=cfg.optim.adam_beta2, adam_eps=cfg.optim.adam_eps,
            use_distributed_optimizer=cfg.optim.distributed_optimizer,
            bf16=cfg.model.dtype == "bf16")
        self.scheduler = build_scheduler(self.optimizer, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                                         warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.steps)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
        dataset = load_dataset(cfg.data, self.tokenizer)
        if self.rank == 0 and dataset.skipped:
            print(f"data: skipped rows by reason: {dict(dataset.skipped)}", flush=True)
        self.data = DataIterator(dataset.examples, batch_size=cfg.train.prompts_per_step,
                                 seed=cfg.train.seed)
        self.prompt_key = {ex.uid: i for i, ex in enumerate(dataset.examples)}
        self.step, self.skipped_in_a_row = 0, 0
        bingo = cfg.reward.bingo
        self.bingo_lambda = DynamicLambda.from_config(bingo) if bingo.enabled else None
        self._resume()
        self.engine = self._build_engine()
        if bingo.enabled:  # the engine still holds the reference (initial) weights here
            self.scorer = build_scorer(bingo.scorer, bingo.scorer_path)
            self.ref_model = self._build_model(wrap=False) if bingo.scorer == "reference_proxy" else None
            self.ref_lengths = self._reference_lengths()
        if self.step > 0:  # the engine starts from the HF weights: bring it to the checkpoint
            sync_weights(self.model, self.arch, self.engine)
        self.telemetry = Telemetry(cfg.telemetry, total_steps=cfg.train.steps, start_step=self.step)

    # ----------------------------------------------------------------- set-up
    def _weights_dir(self) -> Path:
        path = None
        if self.rank == 0:  # one rank converts/caches a packaged model; the others wait
            path = self.cfg.model.weights_dir()
        dist.barrier()
        path = path or self.cfg.model.weights_dir()
        if path is None:
            raise ValueError("model: the RL trainer needs weights: set model.hf_dir (or a preset "
                             "that ships weights, e.g. smollm2-135m-instruct)")
        return Path(path)

    def _build_model(self, wrap: bool = True) -> list:
        """The policy (wrapped for the distributed optimizer), or with wrap=False a frozen copy
        of the initial weights: the reference policy."""
        from nat_megatron.tune.constants import RECOMPUTE  # the one recompute -> Megatron mapping

        chunks = build_model(self.arch, self.layout, dtype=DTYPES[self.cfg.model.dtype],
                             **RECOMPUTE[self.cfg.parallel.recompute])
        load_hf_weights(chunks, self.arch, HFReader(self.hf_dir))
        if not wrap:
            for chunk in chunks:
                chunk.requires_grad_(False).eval()
            return chunks
        return wrap_ddp(chunks, use_distributed_optimizer=self.cfg.optim.distributed_optimizer)

    def _build_engine(self):
        if self.rank != 0:
            return None
        from nat_megatron.rollout.engine import RolloutEngine, SamplingConfig

        r = self.cfg.rollout
        sampling = SamplingConfig(temperature=r.temperature, top_p=r.top_p,
                                  max_new_tokens=r.max_new_tokens, n=r.group_size, seed=self.cfg.train.seed)
        max_len = self.cfg.data.max_prompt_tokens + r.max_new_tokens
        return RolloutEngine(str(self.hf_dir), sampling, dtype={"fp32": "float32", "bf16": "bfloat16"}[r.dtype],
                             max_model_len=max_len, kv_cache_gib=r.kv_cache_gb or 1.0)

    # ------------------------------------------------------------ the RL step
    def rollout(self, prompts) -> list:
        """Rank 0 samples group_size responses per prompt; every rank gets the result."""
        groups = [None]
        if self.rank == 0:
            # A per-step seed: a resumed run samples exactly what the uninterrupted one did.
            self.engine.sampling = dataclasses.replace(self.engine.sampling,
                                                       seed=self.cfg.train.seed * 100_003 + self.step)
            groups = [self.engine.generate([list(p.prompt_ids) for p in prompts])]
        dist.broadcast_object_list(groups, src=0)
        return groups[0]

    def train_step(self) -> dict:
        cfg, tel, G = self.cfg, self.telemetry, self.cfg.rollout.group_size
        prompts = self.data.next_batch()
        with tel.phase("rollout"):
            groups = self.rollout(prompts)
        completions = [c for g in groups for c in g]
        answers = [p.answer for p, g in zip(prompts, groups) for _ in g]
        # Empty responses score but do not train; `index` maps a sample to its completion.
        index = [i for i, c in enumerate(completions) if len(c.token_ids) > 0]
        samples = [Sample(prompt=torch.tensor(prompts[i // G].prompt_ids),
                          response=torch.tensor(completions[i].token_ids),
                          old_logprobs=torch.tensor(completions[i].logprobs), advantage=0.0)
                   for i in index]
        extra = {}
        with tel.phase("reward"):
            texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
            scores = score_batch(cfg.reward.name, texts, answers)
            rewards = torch.tensor(scores.rewards, dtype=torch.float32)
            if cfg.reward.bingo.enabled:
                rewards = rewards + self.bingo_bonus(prompts, completions, texts, samples, index, scores, extra)
        with tel.phase("advantage"):
            samples = self.advantages(samples, index, rewards, extra)
        # This DP rank's share; the selection of a sample is the same wherever it is drawn.
        dp, dp_rank = self.layout.dp, parallel_state.get_data_parallel_rank()
        mine = samples[dp_rank::dp]
        selection = self.select(mine, list(range(len(samples)))[dp_rank::dp])
        micro_batches = build_micro_batches(
            mine, selection, aggregation=cfg.loss.aggregation, seq_multiple=self.layout.seq_multiple,
            num_micro_batches=-(-len(mine) // cfg.parallel.micro_batch_size),
            pad_rows=self.layout.vpp is not None)
        with tel.phase("train"):
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            outs = forward_backward(self.model, micro_batches, nat_loss_fn(cfg.loss),
                                    vocab_size=self.arch.vocab_size, output_mask=KEPT_FIELD,
                                    entropy=cfg.loss.entropy_coef > 0)
            loss, mismatch, tokens = self._reduce_last_stage(outs, micro_batches)
            grad_norm = float("nan")
            finite = math.isfinite(loss)
            if finite:
                # Megatron's fp32 optimizer steps on non-finite grads without checking: look at
                # the global grad norm first (prepare_grads is idempotent; step() repeats it).
                self.optimizer.prepare_grads()
                grad_norm = float(self.optimizer.get_grad_norm())
                finite = math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
                self.scheduler.step(increment=1)
            self._count_skip(finite, loss, grad_norm)
        with tel.phase("sync"):
            sync_weights(self.model, self.arch, self.engine)
        self.step += 1
        n_tokens = sum(len(c.token_ids) for c in completions)
        return {"reward/mean": rewards.mean(), "reward/std": rewards.std(), "reward/accuracy": scores.accuracy,
                "response/length_mean": n_tokens / max(len(completions), 1),
                "nat/kept_fraction": tokens[0] / max(n_tokens, 1), "nat/weight_max": selection.weight_max,
                "nat/weight_mean": selection.weight_mean, "loss": loss, "grad_norm": grad_norm,
                "logprob_mismatch/mean": mismatch[0], "logprob_mismatch/max": mismatch[1],
                "lr": self.optimizer.param_groups[0]["lr"], "tokens/generated": n_tokens,
                "tokens/kept": tokens[0], "tokens/forward": tokens[1], **extra}

    def select(self, samples: list[Sample], ids: list[int]) -> Selection:
        """The NAT selection of `samples` (step-wide indices `ids`): the same on every rank."""
        nat = self.cfg.nat
        options = {k: v for k, v in (("rpc_floor", nat.rpc_floor), ("urs_budget", nat.urs_budget))
                   if v is not None}
        lengths = torch.tensor([len(s.response) for s in samples])
        gens = selection_generators(self.cfg.train.seed, self.step, [self.step * 1_000_000 + i for i in ids])
        return sample(nat.scheme, nat.budget, lengths, gens, **options)

    def advantages(self, samples: list[Sample], index: list[int], rewards: torch.Tensor,
                   extra: dict) -> list[Sample]:
        """GRPO: one group-normalised advantage per response. OTB (nat/otb.py): one per token.

        OTB's baseline needs every group member's logit-gradient proxy on the positions any
        member keeps (nat/otb.py, "NAT rule"): one forward-only pass of the policy over those
        prefixes, all ranks getting the result. The behaviour log-probs stay the engine's.
        """
        G = self.cfg.rollout.group_size
        if self.cfg.advantage.estimator == "grpo":
            adv = group_advantages(rewards, G, scale=self.cfg.advantage.scale)
            return [dataclasses.replace(s, advantage=float(adv[i])) for s, i in zip(samples, index)]
        lengths = torch.tensor([len(s.response) for s in samples])
        group = torch.tensor([i // G for i in index])
        kept = self.select(samples, list(range(len(samples)))).mask
        last_kept = (kept * torch.arange(1, kept.shape[1] + 1)).amax(1)
        prefix = proxy_prefix_lengths(lengths, last_kept, group)
        stats = token_stats(self.model, samples, prefix, layout=self.layout, vocab_size=self.arch.vocab_size,
                            micro_batch_size=self.cfg.parallel.micro_batch_size, sum_p2=True)
        pos = torch.arange(stats["logprobs"].shape[1])[None]
        mask = pos < lengths[:, None]
        proxy = torch.where(pos < prefix[:, None], logit_gradient_proxy(stats["logprobs"], stats["sum_p2"]), 0.0)
        adv = optimal_token_baseline(outcome_returns(rewards[index], mask), proxy, mask, group)
        extra["otb/proxy_tokens"] = int(prefix.sum())
        extra["otb/advantage_abs_mean"] = float(adv.abs()[mask].mean())
        return [dataclasses.replace(s, advantage=adv[j, :len(s.response)].clone()) for j, s in enumerate(samples)]

    def bingo_bonus(self, prompts, completions, texts, samples, index, scores, extra) -> torch.Tensor:
        """Bingo's significance-aware length reward (rewards/bingo.py) for every completion."""
        b, G = self.cfg.reward.bingo, self.cfg.rollout.group_size
        ref_lps = None
        if self.ref_model is not None:  # the reference policy's log-probs of every response
            lengths = torch.tensor([len(s.response) for s in samples])
            lp = token_stats(self.ref_model, samples, lengths, layout=self.layout,
                             vocab_size=self.arch.vocab_size,
                             micro_batch_size=self.cfg.parallel.micro_batch_size)["logprobs"]
            ref_lps = [torch.zeros(0)] * len(completions)
            for j, i in enumerate(index):
                ref_lps[i] = lp[j, :len(samples[j].response)]
        keep = self.scorer.keep_probs(texts, [c.token_ids for c in completions], ref_lps)
        n_sig, n_insig = count_significant(keep, b.threshold)
        ref_sig, ref_insig = self.ref_lengths.get([self.prompt_key[p.uid] for p in prompts for _ in range(G)])
        lam = self.bingo_lambda.update(self.step + 1, scores.accuracy)
        bonus = bingo_bonus(torch.tensor(scores.correct), n_sig, n_insig, ref_sig, ref_insig,
                            lambda_c=b.lambda_c, lambda_wn=b.lambda_wn, lambda_we=b.lambda_we,
                            lambda_we_prime=lam)
        extra.update({"bingo/bonus_mean": float(bonus.mean()), "bingo/lambda_we_prime": lam,
                      "bingo/significant_mean": float(n_sig.float().mean()),
                      "bingo/insignificant_mean": float(n_insig.float().mean()),
                      "reward/correctness_mean": float(torch.tensor(scores.rewards).mean())})
        return bonus

    def _reference_lengths(self) -> ReferenceLengths:
        """Significant / insignificant token counts of the reference model's response to every
        prompt this run will see, measured once (one sampled response per prompt) while the
        engine holds the initial weights, and kept in checkpoint.dir for resumed runs."""
        path = Path(self.cfg.checkpoint.dir) / "bingo_reference.json"
        refs = [None]
        if self.rank == 0:
            ahead = copy.deepcopy(self.data)  # the prompts of the remaining steps, in order
            prompts = {}
            for _ in range(self.step, self.cfg.train.steps):
                for p in ahead.next_batch():
                    prompts[self.prompt_key[p.uid]] = p
            ref = ReferenceLengths.load(path) if path.is_file() else ReferenceLengths()
            missing = ref.missing(list(prompts))
            if missing:
                print(f"bingo: reference responses for {len(missing)} prompts", flush=True)
                sampling = self.engine.sampling
                self.engine.sampling = dataclasses.replace(sampling, n=1, seed=self.cfg.train.seed + 7)
                outs = [g[0] for g in self.engine.generate([list(prompts[k].prompt_ids) for k in missing])]
                self.engine.sampling = sampling
                texts = self.tokenizer.batch_decode([c.token_ids for c in outs], skip_special_tokens=True)
                # The engine's sampled log-probs are the reference policy's (initial weights).
                keep = self.scorer.keep_probs(texts, [c.token_ids for c in outs],
                                              [torch.tensor(c.logprobs) for c in outs])
                n_sig, n_insig = count_significant(keep, self.cfg.reward.bingo.threshold)
                for k, s, i in zip(missing, n_sig.tolist(), n_insig.tolist()):
                    ref.add(k, s, i)
                path.parent.mkdir(parents=True, exist_ok=True)
                ref.save(path)
            refs = [ref]
        dist.broadcast_object_list(refs, src=0)
        return refs[0]

    def _reduce_last_stage(self, outs, micro_batches) -> tuple[float, tuple[float, float], tuple[int, int]]:
        """Global loss (sum / global normaliser), engine-vs-trainer log-prob gap, and the
        (kept, forward) token counts of the step, on all ranks.

        The gap compares the rollout's log-probs with the trainer's on the kept tokens, computed
        by the same weights (the engine was synced after the last update).
        """
        s = torch.zeros(6, dtype=torch.float64)  # loss_sum, count, |diff| sum, kept, forward, max |diff|
        on_owner = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        if on_owner:
            longest = max(mb.seq_len for mb in micro_batches)
            for o, mb in zip(outs, micro_batches):
                s[0] += float(o["loss_sum"])
                s[1] += float(o["count"])
                # The positions the stats describe: padded as under interleaving, this CP rank's.
                mb = (mb.pad_to(longest) if self.layout.vpp else mb).for_cp_rank()
                kept = mb.fields[KEPT_FIELD]
                diff = (o["stats"]["logprobs"] - mb.fields["old_logprobs"]).abs()[kept]
                s[2] += float(diff.sum())
                s[3] += diff.numel()
                s[4] += int((mb.fields["response_pos"] > 0).sum())  # response tokens fed forward
                s[5] = max(float(s[5]), float(diff.max()) if diff.numel() else 0.0)
        peak = s[5:].clone()
        dist.all_reduce(s[:5])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return (float(s[0] / s[1].clamp(min=1)), (float(s[2] / s[3].clamp(min=1)), float(peak)),
                (int(s[3]), int(s[4])))

    def _count_skip(self, finite: bool, loss: float, grad_norm) -> None:
        """NaN/inf loss or grad norm: skip this update, go on; too many in a row stop the run."""
        if finite:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        if self.rank == 0:
            print(f"step {self.step + 1}: non-finite loss {loss} / grad norm {grad_norm}: update skipped",
                  flush=True)
        if self.skipped_in_a_row >= self.cfg.train.max_skipped_steps:
            raise RuntimeError(f"{self.skipped_in_a_row} steps in a row had a non-finite loss or "
                               "gradient (train.max_skipped_steps); lower optim.lr or check the data")

    # ----------------------------------------------------------- checkpoints
    def save(self) -> None:
        root = Path(self.cfg.checkpoint.dir)
        name = f"step_{self.step:06d}"
        extra = {"step": self.step, "data": self.data.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "skipped_in_a_row": self.skipped_in_a_row,
                 "bingo_lambda": self.bingo_lambda.state_dict() if self.bingo_lambda else None}
        save_checkpoint(root / name, self.model, optimizer=self.optimizer, extra=extra)
        if self.rank == 0:
            mark_latest(root, name, keep_last=self.cfg.checkpoint.keep_last)
        dist.barrier()

    def _resume(self) -> None:
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return
        path = latest_checkpoint(self.cfg.checkpoint.dir) if resume == "auto" else Path(resume).expanduser()
        if path is None:
            return
        if not (path / "metadata.json").is_file():
            raise ValueError(f"checkpoint.resume: {path} is not a complete checkpoint (no metadata.json); "
                             "give a step_NNNNNN directory that a finished save wrote, or 'auto'")
        extra = load_checkpoint(path, self.model, optimizer=self.optimizer)
        self.step, self.skipped_in_a_row = extra["step"], extra.get("skipped_in_a_row", 0)
        self.data.load_state_dict(extra["data"])
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.bingo_lambda is not None and extra.get("bingo_lambda"):
            self.bingo_lambda.load_state_dict(extra["bingo_lambda"])
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def export_hf(self, out: str | Path) -> None:
        """Write the current weights as a Hugging Face directory (rank 0 writes; all ranks send)."""
        writer = HFWriter(out) if self.rank == 0 else None
        for name, tensor in hf_weight_stream(self.model, self.arch, engine_ranks=(0,)):
            if writer is not None:
                writer.add(name, tensor)
        if writer is not None:
            writer.close()
            (Path(out) / "config.json").write_text((self.hf_dir / "config.json").read_text())
            copy_tokenizer_files(self.hf_dir, out)
        dist.barrier()

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        every = self.cfg.checkpoint.every
        while self.step < self.cfg.train.steps:
            scalars = self.train_step()
            self.telemetry.log_step(self.step, scalars)
            if self.step % every == 0 or self.step == self.cfg.train.steps:
                self.save()
        if self.cfg.checkpoint.export_dir() is not None:
            self.export_hf(self.cfg.checkpoint.export_dir())

    def close(self) -> None:
        self.telemetry.close()
        if self.engine is not None:
            self.engine.close()
        shutdown()


def run(cfg: Config) -> None:
    """Train `cfg` to the end (resuming from its checkpoint directory when one exists)."""
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
