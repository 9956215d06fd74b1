"""The RL trainer. One step, top to bottom (Trainer.train_step):

    rollout -> rewards -> group advantages -> NAT selection -> truncated micro-batches
    -> Megatron forward/backward with the global normaliser -> optimizer + LR step
    -> weight sync into the rollout engine

Rank 0 owns the colocated vLLM engine and samples for the whole batch; every rank receives the
samples, takes its data-parallel share, and draws the same NAT selection for each sample from
(seed, step, sample id). The rollout log-probs are the behaviour policy's (pi_old in nat.md).
"""

from __future__ import annotations

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
from nat_megatron.nat.selection import sample, selection_generators
from nat_megatron.parallel.distributed import init_distributed, shutdown
from nat_megatron.rewards.registry import score_batch
from nat_megatron.rollout.weight_sync import hf_weight_stream, sync_weights
from nat_megatron.telemetry import Telemetry
from nat_megatron.train.batching import KEPT_FIELD, Sample, build_micro_batches, nat_loss_fn
from nat_megatron.train.forward_backward import forward_backward
from nat_megatron.train.optimizer import build_optimizer, build_scheduler, wrap_ddp

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
        self.step, self.skipped_in_a_row = 0, 0
        self._resume()
        self.engine = self._build_engine()
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

    def _build_model(self) -> list:
        from nat_megatron.tune.constants import RECOMPUTE  # the one recompute -> Megatron mapping

        chunks = build_model(self.arch, self.layout, dtype=DTYPES[self.cfg.model.dtype],
                             **RECOMPUTE[self.cfg.parallel.recompute])
        load_hf_weights(chunks, self.arch, HFReader(self.hf_dir))
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
        cfg, tel = self.cfg, self.telemetry
        prompts = self.data.next_batch()
        with tel.phase("rollout"):
            groups = self.rollout(prompts)
        completions = [c for g in groups for c in g]
        answers = [p.answer for p, g in zip(prompts, groups) for _ in g]
        with tel.phase("reward"):
            texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
            scores = score_batch(cfg.reward.name, texts, answers)
        rewards = torch.tensor(scores.rewards, dtype=torch.float32)
        advantages = group_advantages(rewards, cfg.rollout.group_size, scale=cfg.advantage.scale)
        samples = [Sample(prompt=torch.tensor(prompts[i // cfg.rollout.group_size].prompt_ids),
                          response=torch.tensor(c.token_ids), old_logprobs=torch.tensor(c.logprobs),
                          advantage=float(a))
                   for i, (c, a) in enumerate(zip(completions, advantages)) if len(c.token_ids) > 0]
        # This DP rank's share; the selection of a sample is the same wherever it is drawn.
        dp, dp_rank = self.layout.dp, parallel_state.get_data_parallel_rank()
        ids = [self.step * 1_000_000 + i for i in range(len(samples))][dp_rank::dp]
        mine = samples[dp_rank::dp]
        lengths = torch.tensor([len(s.response) for s in mine])
        options = {k: v for k, v in (("rpc_floor", cfg.nat.rpc_floor), ("urs_budget", cfg.nat.urs_budget))
                   if v is not None}
        selection = sample(cfg.nat.scheme, cfg.nat.budget, lengths,
                           selection_generators(cfg.train.seed, self.step, ids), **options)
        micro_batches = build_micro_batches(
            mine, selection, aggregation=cfg.loss.aggregation, seq_multiple=self.layout.seq_multiple,
            num_micro_batches=-(-len(mine) // cfg.parallel.micro_batch_size),
            pad_rows=self.layout.vpp is not None)
        with tel.phase("train"):
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            outs = forward_backward(self.model, micro_batches, nat_loss_fn(cfg.loss),
                                    vocab_size=self.arch.vocab_size, output_mask=KEPT_FIELD)
            loss, mismatch = self._reduce_last_stage(outs, micro_batches)
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
                "nat/kept_fraction": selection.kept_fraction, "nat/weight_max": selection.weight_max,
                "nat/weight_mean": selection.weight_mean, "loss": loss, "grad_norm": grad_norm,
                "logprob_mismatch/mean": mismatch[0], "logprob_mismatch/max": mismatch[1],
                "lr": self.optimizer.param_groups[0]["lr"], "tokens/generated": n_tokens}

    def _reduce_last_stage(self, outs, micro_batches) -> tuple[float, tuple[float, float]]:
        """Global loss (sum / global normaliser) and engine-vs-trainer log-prob gap, on all ranks.

        The gap compares the rollout's log-probs with the trainer's on the kept tokens, computed
        by the same weights (the engine was synced after the last update).
        """
        s = torch.zeros(5, dtype=torch.float64)  # loss_sum, count, |diff| sum, kept count, max |diff|
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
                s[4] = max(float(s[4]), float(diff.max()) if diff.numel() else 0.0)
        peak = s[4:].clone()
        dist.all_reduce(s[:4])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return float(s[0] / s[1].clamp(min=1)), (float(s[2] / s[3].clamp(min=1)), float(peak))

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
                 "skipped_in_a_row": self.skipped_in_a_row}
        save_checkpoint(root / name, self.model, optimizer=self.optimizer, extra=extra)
        if self.rank == 0:
            mark_latest(root, name, keep_last=self.cfg.checkpoint.keep_last)
        dist.barrier()

    def _resume(self) -> None:
        if self.cfg.checkpoint.resume == "never":
            return
        path = latest_checkpoint(self.cfg.checkpoint.dir)
        if path is None:
            return
        extra = load_checkpoint(path, self.model, optimizer=self.optimizer)
        self.step, self.skipped_in_a_row = extra["step"], extra.get("skipped_in_a_row", 0)
        self.data.load_state_dict(extra["data"])
        self.scheduler.load_state_dict(extra["scheduler"])
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
        if self.cfg.checkpoint.export_hf:
            self.export_hf(Path(self.cfg.checkpoint.dir) / "hf")

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
