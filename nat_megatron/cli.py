"""Command line of the trainer: `nat-megatron train --config FILE [--dry-run] key=value ...` (or
`python -m nat_megatron.train ...`), and the `nat-megatron` console script (`console`), whose
other commands are `convert` (convert_cli.py) and `tune` (tune/cli.py).

The dry run checks a config and its parallel layout on CPU without weights or compute: the
model's shape (preset, model.hf_config or hf_dir/config.json), the layout rules of
parallel/layout.py at the world size the config expects, sequence-length divisibility and the
batch split; the inputs the job will read: data.path (exists, readable, its first rows parse
with the layout and the reward) and checkpoint.resume (the checkpoint exists, is complete, has
its manifest, and was saved by a run of the same meaning); then prints the resolved config
(YAML), the layout, the tuner's memory estimate and what would be resumed.
Without --dry-run, `run(config)` of nat_megatron/train/trainer.py trains; started outside
torchrun/srun, main first starts parallel.world_size local ranks (torchrun) running this command.
Exit codes: 0 ok, 2 invalid config (one line naming the key, no traceback), 1 other failures.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_INVALID = 2

# validate_layout's messages name the quantity they reject; map it to the config key.
_LAYOUT_KEYS = (
    ("layout tp*pp", "parallel.dp"),
    ("vpp=1 ", "parallel.pp"),
    ("vpp=", "parallel.vpp"),
    ("sequence length", "rollout.max_new_tokens"),
    ("global batch", "train.prompts_per_step"),
    ("micro_batch_size", "parallel.micro_batch_size"),
    ("tp=", "parallel.tp"),
    ("pp=", "parallel.pp"),
)


def parse_args(argv: list[str], prog: str = "python -m nat_megatron.train") -> argparse.Namespace:
    """--config FILE, --dry-run, and key.sub=value overrides."""
    p = argparse.ArgumentParser(prog=prog, description="GRPO/NAT RL training with Megatron-Core")
    p.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    p.add_argument("--dry-run", action="store_true", help="validate config and layout on CPU, print them, and exit")
    p.add_argument(
        "--export-hf",
        metavar="DIR",
        help="write the final weights as a Hugging Face model to DIR (same as checkpoint.export_hf=DIR)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show the rollout engine's (vLLM's) log on the console, not only in <run>/logs/",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="override a config value, e.g. nat.budget=0.25 parallel.tp=2",
    )
    args = p.parse_intermixed_args(argv)  # overrides before, between or after the options
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must look like key.sub=value, got {bad}")
    if args.export_hf:
        args.overrides.append(f"checkpoint.export_hf={args.export_hf}")
    if args.verbose:  # read by every rank (the launcher passes its environment on)
        os.environ["NAT_MEGATRON_VERBOSE"] = "1"
    return args


def layout_key(message: str) -> str:
    """The config key a validate_layout message is about."""
    return next((key for text, key in _LAYOUT_KEYS if text in message), "parallel")


def check(cfg) -> dict:
    """Model- and layout-level checks of a valid config; returns what the dry run prints.

    Raises ValueError naming the config key. The rules are validate_layout's (through the
    tuner's check_layout, which adds the memory estimate); nothing is re-implemented here.
    """
    from nat_megatron.parallel.layout import validate_layout

    arch = cfg.model.arch()
    layout = cfg.parallel.layout()
    p, seq_len = cfg.parallel, cfg.seq_len
    if seq_len is not None and seq_len > arch.max_position_embeddings:
        raise ValueError(
            f"rollout.max_new_tokens: prompt limit + generation limit = {seq_len} exceeds "
            f"the model's max_position_embeddings={arch.max_position_embeddings}; lower "
            "rollout.max_new_tokens or data.max_prompt_tokens"
        )
    t = cfg.rollout.tp
    if arch.num_heads % t or (arch.num_kv_heads % t and t % arch.num_kv_heads):
        raise ValueError(
            f"rollout.tp: {t} must divide num_attention_heads={arch.num_heads}, and divide "
            f"or be a multiple of num_key_value_heads={arch.num_kv_heads} (vLLM's rule)"
        )
    # No seq_len rule: the trainer pads every length to the layout's multiple itself.
    kwargs = dict(
        world_size=p.world_size,
        global_batch=cfg.global_batch,
        micro_batch_size=p.micro_batch_size,
        gpus_per_node=p.gpus_per_node if cfg.train.device == "cuda" else None,
    )
    estimate, rollout = None, None
    try:
        validate_layout(arch, layout, **kwargs)
    except ValueError as e:
        raise ValueError(f"{layout_key(str(e))}: {e}") from None
    if cfg.train.device == "cuda":
        rollout = _rollout_plan(cfg, arch)
    try:
        estimate = _estimate(cfg, arch, layout, rollout)
    except ValueError as e:
        raise ValueError(f"{layout_key(str(e))}: {e}") from None
    return {"arch": arch, "layout": layout, "estimate": estimate, "rollout": rollout}


def _rollout_plan(cfg, arch) -> dict:
    """The tuner's view of one engine's share of a GPU (tune/memory.py), from rollout.*."""
    from nat_megatron.tune.constants import H100
    from nat_megatron.tune.memory import rollout_plan

    r = cfg.rollout
    try:
        return rollout_plan(
            arch,
            mem_gb=H100.mem_gb,
            seq_len=cfg.seq_len or r.max_new_tokens,
            tp=r.tp,
            utilization=r.gpu_memory_utilization,
            kv_cache_gb=r.kv_cache_gb,
            gpus_per_node=cfg.parallel.gpus_per_node,
        )
    except ValueError as e:
        raise ValueError(f"rollout.gpu_memory_utilization: {e}") from None


def _estimate(cfg, arch, layout, rollout):
    """The tuner's memory/time estimate of this plan (engine asleep in training, generating
    next to the trainer's resident state), or None if the tuner is unavailable."""
    try:
        from nat_megatron.tune import check_layout
    except ImportError:
        return None
    seq_len = cfg.seq_len or cfg.rollout.max_new_tokens
    return check_layout(
        arch,
        layout,
        seq_len=seq_len,
        response_len=cfg.rollout.max_new_tokens,
        global_batch=cfg.global_batch,
        micro_batch_size=cfg.parallel.micro_batch_size,
        recompute=cfg.parallel.recompute,
        nat=cfg.nat.scheme,
        budget=cfg.nat.budget,
        world_size=cfg.parallel.world_size,
        gpus_per_node=cfg.parallel.gpus_per_node,
        device="h100" if cfg.train.device == "cuda" else "cpu",
        distributed_optimizer=cfg.optim.distributed_optimizer,
        rollout=rollout,
    )


PEEK_ROWS = 20  # usable rows the dry run reads from data.path


def check_data(cfg) -> str:
    """data.path as the job will read it: exists, readable, the first rows parse with the
    layout and the reward's answer check. ValueError naming the key; a report line otherwise."""
    from nat_megatron.data.dataset import read_examples
    from nat_megatron.rewards import answer_check_of

    if cfg.data.path is None:
        return "# data: the embedded arithmetic problems"
    path = Path(cfg.data.path).expanduser()
    if not path.is_file():
        raise ValueError(
            f"data.path: {path} does not exist (seen from {os.getcwd()}); fix the path, or run the "
            "dry run where the job's files are"
        )
    if not os.access(path, os.R_OK):
        raise ValueError(f"data.path: {path} is not readable by this user; fix its permissions")
    try:
        ds = read_examples(path, cfg.data.layout, PEEK_ROWS, answer_check=answer_check_of(cfg.reward.name))
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("data.") else f"data.path: {msg}") from None
    except OSError as e:
        raise ValueError(f"data.path: cannot read {path} ({e}); fix the file or the path") from None
    skipped = f", skipped on the way: {dict(ds.skipped)}" if ds.skipped else ""
    return f"# data: {path}: layout {ds.layout}, the first {len(ds)} rows parse{skipped}"


def check_resume(cfg) -> str:
    """checkpoint.resume as the job will see it: a given checkpoint exists, is complete, has
    its manifest and run.json and a run of the same meaning saved it. ValueError naming the key."""
    from nat_megatron.checkpoint.dist_ckpt import read_meta
    from nat_megatron.checkpoint.integrity import COMPLETE_MARK, MANIFEST, complete_checkpoints, pointer_problem
    from nat_megatron.checkpoint.lock import DirLock
    from nat_megatron.checkpoint.resume import check_run

    resume = cfg.checkpoint.resume
    if resume == "never":
        return "# resume: never (starts at step 0)"
    notes = []
    holder = DirLock(Path(cfg.checkpoint.dir).expanduser()).holder()
    if holder != {}:
        notes.append(
            f"# note: checkpoint.dir is locked by {holder or 'an unreadable lock file'}: "
            "another job may be using it (the job would stop unless that holder is gone)"
        )
    if resume == "auto":
        root = Path(cfg.checkpoint.dir).expanduser()
        found = complete_checkpoints(root)
        if not found:
            return "\n".join([f"# resume: no complete checkpoint in {root}: starts at step 0", *notes])
        path = found[0]
        problem = pointer_problem(root)
        if problem:
            notes.append(f"# note: {problem}; the job resumes from the newest complete checkpoint")
    else:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"checkpoint.resume: {path} does not exist; give a step_NNNNNN directory, 'auto' or 'never'"
            )
        if not (path / COMPLETE_MARK).is_file():
            raise ValueError(
                f"checkpoint.resume: {path} is not a complete checkpoint (no {COMPLETE_MARK}); "
                "give a step_NNNNNN directory that a finished save wrote, or 'auto'"
            )
    if not (path / MANIFEST).is_file():
        raise ValueError(
            f"checkpoint.resume: {path} has no {MANIFEST}, so it cannot be verified and will not be "
            "loaded; give a checkpoint this trainer saved"
        )
    try:
        check_run(path, read_meta(path), config=cfg.to_dict(), fingerprint=None)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(("checkpoint.", "data.")) else f"checkpoint.resume: {msg}") from None
    return "\n".join([f"# resume: from {path} (files are hashed against its manifest at the start)", *notes])


def dry_run(cfg) -> str:
    """The dry run's report: resolved config, layout, micro-batching, the estimate, and the
    checks of data.path and checkpoint.resume."""
    from nat_megatron.parallel.layout import micro_batches_per_rank

    info = check(cfg)
    inputs = [check_data(cfg), check_resume(cfg)]
    arch, lay, est, roll = info["arch"], info["layout"], info["estimate"], info["rollout"]
    m = micro_batches_per_rank(lay, cfg.global_batch, cfg.parallel.micro_batch_size)
    budget = cfg.parallel.max_tokens_per_micro_batch
    grouping = (
        f"micro-batches of up to {budget} padded tokens"
        if budget
        else f"up to {m} micro-batches of {cfg.parallel.micro_batch_size} per DP rank"
    )
    if cfg.parallel.share_prompt:
        grouping += ", the responses of a prompt in one row behind one copy of it"
    lines = [
        "# resolved config",
        cfg.to_yaml().rstrip(),
        "",
        f"# model: {arch.family}, {arch.num_params() / 1e9:.3f} B parameters, "
        f"{arch.num_layers} layers, {arch.num_heads} heads / {arch.num_kv_heads} KV heads",
        f"# layout: tp={lay.tp} pp={lay.pp} vpp={lay.vpp} cp={lay.cp} dp={lay.dp} "
        f"sequence_parallel={lay.sequence_parallel} (world size {lay.world_size})",
        f"# step: {cfg.global_batch} sequences = {cfg.train.prompts_per_step} prompts x "
        f"{cfg.rollout.group_size}; {grouping}; "
        f"max sequence {cfg.seq_len} tokens (lengths pad to a multiple of {lay.seq_multiple})",
    ]
    t = cfg.rollout.tp
    engines = cfg.parallel.world_size // t
    lines.append(
        f"# rollout: {engines} vLLM engine{'s' * (engines > 1)} x {t} rank{'s' * (t > 1)} "
        f"(tensor parallel), engine e on ranks e*{t}..e*{t}+{t - 1}; "
        f"{cfg.train.prompts_per_step / engines:g} prompts x {cfg.rollout.group_size} "
        "samples per engine per step"
    )
    if roll is not None:
        lines.append(
            f"# rollout memory per GPU while generating: weights {roll['weights_gb']} GB, "
            f"KV cache {roll['kv_cache_gb']} GB (~{roll['kv_cache_sequences']:.0f} sequences of "
            f"{cfg.seq_len} tokens), {roll['bytes'] / 2**30:.1f} GB in all "
            f"(gpu_memory_utilization {roll['gpu_memory_utilization']}); asleep during training: "
            f"{roll['asleep_bytes'] / 2**30:.1f} GB"
        )
    if est is not None:
        gb = est.memory.gb(2)
        where = "GPU" if cfg.train.device == "cuda" else "process"
        lines.append(f"# estimated training memory per {where} (engine asleep): {gb.pop('total')} GB {gb}")
        if roll is not None:
            lines.append(
                f"# estimated memory per GPU while generating (engine + trainer's weights, grads, "
                f"optimizer): {est.rollout_peak / 2**30:.2f} GB"
            )
        lines.append(f"# fits: {est.fits}" + (f" ({est.why_not})" if est.why_not else ""))
        lines.append(f"# estimated step time {est.time.step_s:.2f} s, {est.time.tokens_per_s_per_gpu:.0f} tokens/s/GPU")
    return "\n".join(lines + inputs)


def launch(cfg, argv: list[str]) -> int | None:
    """Make this process a rank of the job: None to train here, or the exit code of the local
    ranks it started (torchrun) when run outside a distributed job."""
    from nat_megatron.parallel.launch import in_distributed_job, relaunch, single_process_env

    n = cfg.parallel.world_size
    if in_distributed_job():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != n:
            raise ValueError(
                f"parallel.world_size: the config expects {n} processes but this job "
                f"has WORLD_SIZE={world}; set parallel.world_size={world} or start {n}"
            )
        return None
    if n == 1:
        single_process_env()
        return None
    if cfg.train.device == "cuda" and n > cfg.parallel.gpus_per_node:
        raise ValueError(
            f"parallel.world_size: {n} processes span several nodes; start them with "
            "torchrun or srun on every node (see the config file's header)"
        )
    return relaunch(n, ["-m", "nat_megatron.train", *argv])


def main(argv: list[str] | None = None, prog: str = "python -m nat_megatron.train") -> int:
    """The train command; returns the process exit code."""
    from nat_megatron.config import load_config

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(dry_run(cfg), flush=True)
            print("dry run OK", flush=True)
            return 0
    except ValueError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        return EXIT_INVALID
    from nat_megatron.train.trainer import run

    try:
        check(cfg)  # fail on a bad layout before any rank starts
        code = launch(cfg, argv)
    except ValueError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        return EXIT_INVALID
    return code if code is not None else (run(cfg) or 0)


COMMANDS = {
    "train": "train a config (python -m nat_megatron.train), or check it with --dry-run",
    "convert": "convert checkpoints between Hugging Face and Megatron-Core, and verify them",
    "tune": "rank parallel layouts for a model and GPU count (memory and step-time estimates)",
}


def console(argv: list[str] | None = None) -> int:
    """The `nat-megatron` console script (and `python -m nat_megatron`): COMMAND [options]."""
    p = argparse.ArgumentParser(
        prog="nat-megatron",
        description="GRPO/NAT RL training with Megatron-Core.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "".join(f"  {name:<9} {what}\n" for name, what in COMMANDS.items())
        + "\n`nat-megatron COMMAND --help` shows a command's options.",
    )
    p.add_argument("command", choices=tuple(COMMANDS), metavar="COMMAND")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's options")
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    prog = f"nat-megatron {args.command}"
    if args.command == "convert":
        from nat_megatron.convert_cli import main as convert

        return convert(args.args, prog)
    if args.command == "tune":
        from nat_megatron.tune.cli import main as tune

        return tune(args.args, prog)
    return main(args.args, prog)
