"""The config tree: presets round-trip, overrides apply, bad keys and values name the key."""

from pathlib import Path

import pytest
import yaml

from nat_megatron.config import Config, apply_override, load_config
from nat_megatron.nat.loss import LossConfig

PRESETS = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))
CPU = next(p for p in PRESETS if p.name == "smollm2-135m-cpu.yaml")


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"smollm2-135m-cpu", "qwen3-8b", "llama3.1-8b", "qwen2.5-32b", "llama3.1-70b"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_round_trip(path, tmp_path):
    cfg = load_config(path)
    assert Config.from_dict(cfg.to_dict()) == cfg
    out = tmp_path / "saved.yaml"
    out.write_text(cfg.to_yaml())
    assert load_config(out) == cfg
    assert cfg.parallel.layout().world_size == cfg.parallel.world_size


def test_default_job():
    cfg = load_config(CPU)
    assert cfg.nat.scheme == "rpc" and cfg.nat.budget == 0.5
    assert cfg.train.device == "cpu" and cfg.parallel.world_size == 2
    assert isinstance(cfg.loss, LossConfig)
    arch = cfg.model.arch()
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads) == (30, 9, 3)


def test_overrides():
    cfg = load_config(
        CPU,
        [
            "nat.budget=0.25",
            "optim.lr=1e-5",
            "parallel.pp=1",
            "loss.aggregation=seq-mean-token-mean",
            "data.path=null",
            "model.hf_config.num_hidden_layers=4",
            "model.hf_config.model_type=llama",
            "model.hf_config.hidden_size=64",
            "model.hf_config.intermediate_size=128",
            "model.hf_config.vocab_size=300",
            "model.hf_config.num_attention_heads=4",
        ],
    )
    assert cfg.nat.budget == 0.25 and cfg.optim.lr == 1e-5 and cfg.parallel.layout().dp == 2
    assert cfg.loss.aggregation == "seq-mean-token-mean"
    assert cfg.model.arch().num_layers == 4  # hf_config takes precedence over the preset


@pytest.mark.parametrize(
    "override, message",
    [
        ("nat.budget=1.5", "nat.budget: must be in (0, 1], got 1.5"),
        ("nat.buget=0.5", "nat.buget: unknown key; did you mean nat.budget?"),
        ("bogus.x=1", "bogus: unknown key"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("train.steps=2.5", "train.steps: expected an integer"),
        ("parallel.sequence_parallel=1", "parallel.sequence_parallel: expected true or false"),
        ("parallel.dp=many", "parallel.dp: must be an integer >= 1 or 'auto'"),
        ("parallel.sequence_parallel=true", "parallel.sequence_parallel: layout sequence_parallel needs tp >= 2"),
        ("nat.scheme=rpc+urs", None),
        ("nat.scheme=bogus", "nat.scheme: use one of"),
        ("nat.rpc_floor=0.1", None),
        ("nat.rpc_floor=0.45", None),
        ("nat.rpc_floor=0.9", "nat.rpc_floor: must be in (0, budget=0.5]"),
        ("loss.eps_low=2", "loss.eps_low"),
        ("loss.aggregation=mean", "loss.aggregation"),
        ("data.size=0", "data.size"),
        ("reward.name=nope", "reward.name: unknown reward 'nope'"),
        ("rollout.engine=sglang", "rollout.engine"),
        ("model.dtype=bf16", "model.dtype: train.device=cpu trains in fp32"),
        ("model.preset=gpt5", "model.preset: unknown preset"),
        ("model.fp8=fp4", "model.fp8: use one of (None, 'delayed', 'tensorwise', 'blockwise', 'mxfp8')"),
        ("model.fp8=delayed", "model.fp8: FP8 needs Transformer Engine's CUDA kernels and train.device=cpu has none"),
        ("nat.budget", "expected key.sub=value"),
        ("nat=3", "nat: must be a mapping"),
        ("checkpoint.allow_config_change=maybe", "checkpoint.allow_config_change: expected true or false"),
        ("checkpoint.allow_config_change=true", None),
        ("data.allow_changed=2", "data.allow_changed: expected true or false"),
        ("data.allow_changed=true", None),
        ("telemetry.wandb.enabled=true", None),
        ("telemetry.wandb.mode=cloud", "telemetry.wandb.mode: use one of ('offline', 'online')"),
        ("telemetry.wandb.project=' '", "telemetry.wandb.project: must be a non-empty name"),
        ("telemetry.wandb.enabled=yes please", "telemetry.wandb.enabled: expected true or false"),
    ],
)
def test_bad_values_name_the_key(override, message):
    if message is None:
        load_config(CPU, [override])
        return
    with pytest.raises(ValueError) as err:
        load_config(CPU, [override])
    assert message in str(err.value)


def test_fp8_on_gpu_configs():
    """Every recipe validates on a GPU config; FP8 needs a bf16 model."""
    gpu = ["train.device=cuda", "model.dtype=bf16"]
    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        assert load_config(CPU, [*gpu, f"model.fp8={recipe}"]).model.fp8 == recipe
    assert load_config(CPU, gpu).model.fp8 is None
    with pytest.raises(ValueError, match=r"^model.fp8: FP8 runs the GEMMs of a bf16 model"):
        load_config(CPU, ["train.device=cuda", "model.dtype=fp16", "model.fp8=delayed"])


def test_otb_bingo_and_their_bad_values():
    cfg = load_config(CPU, ["advantage.estimator=otb", "reward.bingo.enabled=true"])
    assert cfg.advantage.estimator == "otb" and cfg.reward.bingo.scorer == "reference_proxy"
    for override, message in [
        ("advantage.estimator=gae", "advantage.estimator: use one of"),
        ("reward.bingo.lambda_c=-1", "reward.bingo.lambda_c: must be >= 0"),
        ("reward.bingo.lambda_we=-0.5", "reward.bingo.lambda_we: must be >= 0"),
        ("reward.bingo.scorer=llmlingua3", "reward.bingo.scorer: unknown scorer"),
        ("reward.bingo.scorer=hf_token_classifier", "reward.bingo.scorer_path"),
        ("reward.bingo.lamda_c=1", "reward.bingo.lamda_c"),
        ("loss.kl_beta=-0.1", "loss.kl_beta"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(CPU, ["reward.bingo.enabled=true", override])
    with pytest.raises(ValueError, match="reward.bingo.scorer_path: .*does not exist|reward.bingo.scorer_path"):
        load_config(
            CPU,
            [
                "reward.bingo.enabled=true",
                "reward.bingo.scorer=hf_token_classifier",
                "reward.bingo.scorer_path=/no/such/dir",
            ],
        )


def test_missing_model_and_bad_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(yaml.safe_dump({"train": {"steps": 1}}))
    with pytest.raises(ValueError, match="config: .*model"):
        load_config(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_apply_override_nested():
    d = {"a": {"b": 1}}
    apply_override(d, "a.c.d=[1, 2]")
    assert d == {"a": {"b": 1, "c": {"d": [1, 2]}}}
    with pytest.raises(ValueError, match="a.b: is a value"):
        apply_override(d, "a.b.c=1")


def test_rl_algorithm_keys_and_their_bad_values():
    cfg = load_config(
        CPU,
        [
            "loss.kl_beta=0.01",
            "loss.kl_estimator=k2",
            "loss.old_logprobs=recompute",
            "loss.tis_cap=2.0",
            "loss.clip_ratio_c=3",
            "train.mini_batches=2",
            "train.epochs=2",
        ],
    )
    assert cfg.loss.kl_estimator == "k2" and cfg.loss.tis_cap == 2.0 and cfg.train.mini_batches == 2
    for overrides, message in [
        (["loss.kl_estimator=k4"], "loss.kl_estimator"),
        (["loss.clip_ratio_c=0.5"], "loss.clip_ratio_c"),
        (["loss.tis_cap=2"], "loss.tis_cap needs"),
        (["loss.old_logprobs=engine"], "loss.old_logprobs"),
        (["train.mini_batches=0"], "train.mini_batches: must be >= 1"),
        (["train.mini_batches=8"], "train.mini_batches: each data-parallel replica"),
        (["train.epochs=0"], "train.epochs: must be >= 1"),
        (["rollout.group_size=1"], "rollout.group_size: GRPO and OTB"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(CPU, overrides)


def test_dynamic_sampling_and_overlong_keys():
    cfg = load_config(CPU, ["rollout.filter_groups=true", "rollout.max_resample=2", "reward.overlong_buffer=16"])
    assert cfg.rollout.max_resample == 2 and cfg.reward.overlong_buffer == 16
    for overrides, message in [
        (["rollout.max_resample=2"], "rollout.max_resample: resampling refills"),
        (["rollout.filter_groups=true", "rollout.max_resample=-1"], "rollout.max_resample: must be >= 0"),
        (["reward.overlong_buffer=1000"], "reward.overlong_buffer: must be at most"),
        (["reward.overlong_penalty=-1"], "reward.overlong_penalty: must be >= 0"),
        (["eval.samples_per_prompt=0"], "eval.samples_per_prompt: must be >= 1"),
        (["eval.every=-1"], "eval.every: must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(CPU, overrides)


def test_token_budget_micro_batches_key():
    assert load_config(CPU, ["parallel.max_tokens_per_micro_batch=2048"]).parallel.max_tokens_per_micro_batch == 2048
    with pytest.raises(ValueError, match="parallel.max_tokens_per_micro_batch: must hold the longest sequence"):
        load_config(CPU, ["parallel.max_tokens_per_micro_batch=100"])
    with pytest.raises(ValueError, match="parallel.max_tokens_per_micro_batch: must be >= 1"):
        load_config(CPU, ["parallel.max_tokens_per_micro_batch=0"])


def test_wandb_dir():
    """W&B's run goes next to the TensorBoard directory unless telemetry.wandb.dir says where."""
    cfg = load_config(CPU, ["telemetry.wandb.enabled=true"]).telemetry
    assert cfg.wandb.mode == "offline" and cfg.wandb.project == "nat_megatron"
    assert cfg.wandb_dir() == Path(cfg.tensorboard_dir).parent / "wandb"
    assert load_config(CPU, ["telemetry.wandb.dir=elsewhere"]).telemetry.wandb_dir() == Path("elsewhere")
    with pytest.raises(ValueError, match=r"^telemetry.wandb.dir: its default is next to telemetry.tensorboard_dir"):
        load_config(CPU, ["telemetry.wandb.enabled=true", "telemetry.tensorboard_dir=null"])


def test_scheme_override_keeps_unused_options():
    """The default config sets nat.rpc_floor; nat.scheme=urs or none ignores it (and the
    selection gets no option it does not take), rpc uses it again."""
    for scheme, budget, opts in (("urs", 0.5, {}), ("none", 1, {}), ("rpc", 0.5, {"rpc_floor": 0.25})):
        cfg = load_config(CPU, [f"nat.scheme={scheme}", f"nat.budget={budget}"])
        assert cfg.nat.rpc_floor == 0.25 and cfg.nat.options() == opts
    cfg = load_config(CPU, ["nat.scheme=rpc+urs", "nat.urs_budget=0.8", "nat.rpc_floor=0.2"])
    assert cfg.nat.options() == {"rpc_floor": 0.2, "urs_budget": 0.8}
    assert load_config(CPU, ["nat.scheme=rpc", "nat.urs_budget=0.8"]).nat.options() == {"rpc_floor": 0.25}
