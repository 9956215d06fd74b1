"""TRL's GRPOTrainer on the prompts tools/bench_vs_trl.py wrote; runs in TRL's own virtualenv.

    <trl venv>/bin/python tools/trl_grpo_worker.py --spec SPEC.json --out OUT.json

The spec names the model directory, the training prompts in step order (text already in the
chat template, with reference answers), the held-out prompts, the shared settings and whether
TRL trains with bf16 autocast (the held-out completions are fp32 either way). Writes the wall
time of every optimizer step, TRL's per-step logs (completion lengths among them) and
the greedy completions of the held-out prompts before and after training; the bench scores
those with the trainer's own reward, so both sides are judged alike. Rewards during training
are the trainer's math_verify reward (imported from this checkout; it needs no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch: int = 32) -> list[str]:
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    sys.path.insert(0, str(ROOT))
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import nat_megatron.rewards.verifiers  # noqa: F401  (registers math_verify)
    from nat_megatron.rewards.registry import score_batch

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    eval_prompts = [row["prompt"] for row in spec["eval"]]
    t0 = time.perf_counter()
    before = greedy(model, tokenizer, eval_prompts, spec["max_new_tokens"])
    eval_s = [time.perf_counter() - t0]

    def reward(prompts, completions, answer, **_):
        return score_batch(spec["reward"], completions, answer).rewards  # in-process, its own limits

    class Clock(TrainerCallback):
        def __init__(self):
            self.steps, self.logs, self._t = [], [], None

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.steps.append(time.perf_counter() - self._t)

        def on_log(self, _args, _state, _control, logs=None, **k):
            self.logs.append(dict(logs or {}))

    clock = Clock()
    config = GRPOConfig(
        output_dir=str(Path(args.out).parent / "trl_out"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["prompts_per_step"] * spec["group_size"],
        gradient_accumulation_steps=1,
        num_generations=spec["group_size"],
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_p=spec["top_p"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=spec["clip_grad"],
        beta=0.0,
        loss_type="dapo",  # token-mean over the step's tokens, as the trainer's loss.aggregation
        scale_rewards="group",
        shuffle_dataset=False,  # the prompts in the order the trainer saw them
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=spec["bf16"],  # autocast over fp32 weights (faster on CPUs with AVX-512 BF16)
        seed=spec["seed"],
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL's default recomputes activations: slower, and 135M fits
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=Dataset.from_list(spec["train"]),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    # With bf16 accelerate wrapped the model's forward in autocast: drop it, so that the held-out
    # completions after training are computed in fp32 like those before it.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    model.config.use_cache = True  # generate with the KV cache, as before training
    t0 = time.perf_counter()
    after = greedy(model, tokenizer, eval_prompts, spec["max_new_tokens"])
    eval_s.append(time.perf_counter() - t0)
    Path(args.out).write_text(
        json.dumps(
            {
                "step_seconds": clock.steps,
                "logs": clock.logs,
                "eval_before": before,
                "eval_after": after,
                "eval_seconds": eval_s,
                "threads": torch.get_num_threads(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
