"""Bingo length reward (nat.md §5): hand-computed bonuses, lambda_we' schedule, config, cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nat_megatron.rewards.bingo import BingoConfig, DynamicLambda, ReferenceLengths, bingo_bonus

LAMBDAS = dict(lambda_c=5.0, lambda_wn=2.0, lambda_we=5.0)
FLOOR = -2 * 5.0 / (math.pi / 2)  # -6.366...


def bonus(correct, n_sig, n_insig, n_sig_ref, n_insig_ref, lambda_we_prime=0.0):
    t = lambda xs: torch.tensor(xs)
    return bingo_bonus(
        t(correct), t(n_sig), t(n_insig), t(n_sig_ref), t(n_insig_ref), lambda_we_prime=lambda_we_prime, **LAMBDAS
    )


# ----- bingo_bonus ------------------------------------------------------------------------


def test_correct_branch_cosine_of_filler_ratio():
    got = bonus([True, True, True], [7, 7, 7], [5, 0, 20], [9, 9, 9], [10, 10, 10])
    # R_low = 0.5 -> 5 cos 0.5; R_low = 0 -> full 5; R_low = 2 > pi/2 clamps -> 5 cos(pi/2) = 0
    assert got.tolist() == pytest.approx([5 * math.cos(0.5), 5.0, 0.0], abs=1e-6)
    assert got.dtype == torch.float32


def test_correct_branch_ignores_significant_tokens_and_lambda_we_prime():
    a = bonus([True], [1], [5], [100], [10], lambda_we_prime=-6.0)
    b = bonus([True], [500], [5], [1], [10], lambda_we_prime=3.0)
    assert a.item() == pytest.approx(b.item()) == pytest.approx(5 * math.cos(0.5))


def test_wrong_branch_negative_inner_value():
    # R_low = 0.5, R_high = 3, lambda_we' = 0: 2 (cos 0.5 - 1) - 5
    got = bonus([False], [30], [5], [10], [10])
    assert got.item() == pytest.approx(2 * (math.cos(0.5) - 1) - 5, abs=1e-6)
    # lambda_we' = floor, R_high = 0.5: long significant reasoning penalised too
    got = bonus([False], [5], [5], [10], [10], lambda_we_prime=FLOOR)
    assert got.item() == pytest.approx(2 * (math.cos(0.5) - 1) + FLOOR * 0.5 - 5, abs=1e-5)
    # R_low > pi/2 clamps: cos = 0, so the filler term is -lambda_wn
    got = bonus([False], [10], [40], [10], [10])
    assert got.item() == pytest.approx(-2.0 - 5.0, abs=1e-6)


def test_wrong_branch_positive_inner_value_is_capped_at_zero():
    # 2 (cos 0.5 - 1) + 3 * 3 - 5 = 3.755... > 0 -> min(0, .) = 0: a wrong answer earns nothing
    inner = 2 * (math.cos(0.5) - 1) + 3 * 3 - 5
    assert inner > 0
    assert bonus([False], [30], [5], [10], [10], lambda_we_prime=3.0).item() == 0.0


def test_mixed_batch_picks_branch_per_sample():
    got = bonus([True, False], [30, 30], [5, 5], [10, 10], [10, 10])
    assert got.tolist() == pytest.approx([5 * math.cos(0.5), 2 * (math.cos(0.5) - 1) - 5], abs=1e-6)


def test_zero_reference_count_divides_by_one():
    # n_insig_ref = 0: R_low = n_insig itself. 0 filler -> full bonus; 1 -> 5 cos 1; 2 -> 0.
    got = bonus([True, True, True], [3, 3, 3], [0, 1, 2], [3, 3, 3], [0, 0, 0])
    assert got.tolist() == pytest.approx([5.0, 5 * math.cos(1.0), 0.0], abs=1e-6)
    # n_sig_ref = 0: R_high = n_sig = 2 (finite, no inf/nan)
    got = bonus([False], [2], [0], [0], [4], lambda_we_prime=1.0)
    assert got.item() == pytest.approx(min(0.0, 0 + 1.0 * 2 - 5))
    assert torch.isfinite(got).all()


def test_float_reference_means_and_shape_check():
    got = bingo_bonus(
        torch.tensor([True]),
        torch.tensor([4]),
        torch.tensor([3]),
        torch.tensor([4.0]),
        torch.tensor([6.0]),
        lambda_we_prime=0.0,
        **LAMBDAS,
    )
    assert got.item() == pytest.approx(5 * math.cos(0.5))
    with pytest.raises(ValueError, match="one shape"):
        bingo_bonus(
            torch.tensor([True, False]),
            torch.tensor([1]),
            torch.tensor([1]),
            torch.tensor([1]),
            torch.tensor([1]),
            lambda_we_prime=0.0,
            **LAMBDAS,
        )


# ----- DynamicLambda ----------------------------------------------------------------------


def test_static_schedule_is_constant():
    lam = DynamicLambda(schedule="static", lambda_we_prime=-1.5)
    assert [lam.update(t, 0.1 * (t % 10)) for t in range(30)] == [-1.5] * 30


def _rising_then_flat(lam: DynamicLambda, upto: int) -> list[float]:
    # accuracy rises 3 percentage points per step until step 7, then stays at 0.21
    return [lam.update(t, 0.03 * min(t, 7)) for t in range(upto)]


def test_dynamic_warmup_slope_trigger_decay_floor():
    lam = DynamicLambda(lambda_we=5.0, start_step=5, window=4)
    vals = _rising_then_flat(lam, 30)
    assert vals[:5] == [0.0] * 5  # before start_step
    assert vals[5:8] == pytest.approx([3.0] * 3)  # slope phase: exact slope 3 pp/step
    # step 8: points (5,15) (6,18) (7,21) (8,21): slope = 10.5 / 5 = 2.1 <= 2.5 -> trigger at 2.1
    assert vals[8] == pytest.approx(2.1)
    # then -0.5 per step: 2.1 - 0.5k until the floor -2*5/(pi/2) at k = 17 (step 25)
    for k in range(1, 17):
        assert vals[8 + k] == pytest.approx(2.1 - 0.5 * k)
    assert vals[25:] == pytest.approx([FLOOR] * 5)
    assert FLOOR == pytest.approx(-6.3662, abs=1e-4)
    assert lam.decaying


def test_decay_never_returns_to_slope_phase():
    lam = DynamicLambda(start_step=5, window=4)
    _rising_then_flat(lam, 10)  # triggered at step 8, at 1.6 by step 9
    # accuracy now rises steeply again; the schedule keeps decaying
    vals = [lam.update(t, min(1.0, 0.21 + 0.1 * (t - 9))) for t in range(10, 14)]
    assert vals == pytest.approx([1.1, 0.6, 0.1, -0.4])


def test_window_must_fill_before_slope_phase():
    # start_step 0 but window 4: zero until 4 accuracies are recorded (steps 0..2)
    lam = DynamicLambda(start_step=0, window=4)
    assert [lam.update(t, 0.05 * t) for t in range(5)] == pytest.approx([0, 0, 0, 5.0, 5.0])


def test_slope_scale_and_trigger_below_floor():
    lam = DynamicLambda(start_step=3, window=4, slope_scale=0.5)
    vals = [lam.update(t, 0.03 * t) for t in range(6)]
    assert vals[3] == pytest.approx(1.5)  # 3 pp/step * 0.5 <= 2.5: triggers at once
    assert vals[4:] == pytest.approx([1.0, 0.5])
    # a collapsing accuracy (slope -10 pp/step) starts the decay at the floor, not below it
    lam = DynamicLambda(start_step=3, window=4)
    vals = [lam.update(t, 1.0 - 0.1 * t) for t in range(6)]
    assert vals[3:] == pytest.approx([FLOOR] * 3)


def test_decay_counts_steps_not_calls():
    lam = DynamicLambda(start_step=5, window=4)
    _rising_then_flat(lam, 9)  # trigger at step 8 with 2.1
    assert lam.update(12, 0.2) == pytest.approx(2.1 - 0.5 * 4)  # steps 9..11 were skipped


def test_update_validates_step_order_and_accuracy():
    lam = DynamicLambda()
    lam.update(3, 0.5)
    with pytest.raises(ValueError, match="once per step"):
        lam.update(3, 0.5)
    with pytest.raises(ValueError, match="fraction"):
        lam.update(4, 55.0)


def test_state_dict_round_trip_resumes_identically():
    a = DynamicLambda(start_step=5, window=4)
    _rising_then_flat(a, 7)  # in the slope phase, history full
    state = json.loads(json.dumps(a.state_dict()))  # plain python types only
    b = DynamicLambda(start_step=5, window=4)
    b.load_state_dict(state)
    accs = [0.21, 0.21, 0.3, 0.1, 0.5, 0.5]
    assert [a.update(7 + i, x) for i, x in enumerate(accs)] == [b.update(7 + i, x) for i, x in enumerate(accs)]
    assert a.state_dict() == b.state_dict() and a.decaying
    with pytest.raises(ValueError, match="schedule"):
        DynamicLambda(schedule="static").load_state_dict(state)


def test_from_config_uses_defaults():
    lam = DynamicLambda.from_config(BingoConfig())
    assert lam.floor == pytest.approx(FLOOR)
    assert (lam.start_step, lam.window, lam.slope_threshold, lam.decay) == (50, 10, 2.5, 0.5)
    assert [lam.update(t, 0.01 * t) for t in range(50)] == [0.0] * 50


# ----- BingoConfig ------------------------------------------------------------------------


def test_config_defaults_valid():
    cfg = BingoConfig()
    assert (cfg.enabled, cfg.scorer, cfg.schedule) == (False, "reference_proxy", "dynamic")
    assert (cfg.lambda_c, cfg.lambda_wn, cfg.lambda_we) == (5.0, 2.0, 5.0)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(lambda_c=-1.0), r"^reward\.bingo\.lambda_c: must be >= 0, got -1\.0"),
        (dict(lambda_we=-0.5), r"^reward\.bingo\.lambda_we: must be >= 0"),
        (dict(scorer="llmlingua"), r"^reward\.bingo\.scorer: unknown scorer 'llmlingua'.*refer"),
        (dict(scorer="hf_token_classifier"), r"^reward\.bingo\.scorer_path: .*needs the directory"),
        (dict(scorer_path="/x"), r"^reward\.bingo\.scorer_path: applies to scorer 'hf_token"),
        (dict(schedule="cosine"), r"^reward\.bingo\.schedule: unknown schedule"),
        (dict(window=1), r"^reward\.bingo\.window: must be an integer >= 2"),
        (dict(decay=0.0), r"^reward\.bingo\.decay"),
        (dict(threshold=1.5), r"^reward\.bingo\.threshold"),
        (dict(lambda_we_prime=1.0), r"^reward\.bingo\.lambda_we_prime: is the static schedule's"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        BingoConfig(**kwargs)


def test_config_scorer_path_must_exist_when_enabled(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"^reward\.bingo\.scorer_path: .*not a directory"):
        BingoConfig(enabled=True, scorer="hf_token_classifier", scorer_path=missing)
    # disabled: the file is not needed on this machine
    BingoConfig(enabled=False, scorer="hf_token_classifier", scorer_path=missing)
    BingoConfig(enabled=True, scorer="hf_token_classifier", scorer_path=str(tmp_path))
    BingoConfig(schedule="static", lambda_we_prime=-2.0)


def test_config_builds_through_the_config_tree_builder():
    # the integrator nests BingoConfig as reward.bingo; config.py's builder must accept it as is
    from nat_megatron.config import _build

    cfg = _build(BingoConfig, {"enabled": True, "lambda_c": 3, "window": 5}, "reward.bingo")
    assert cfg.lambda_c == 3.0 and isinstance(cfg.lambda_c, float) and cfg.window == 5
    with pytest.raises(ValueError, match=r"^reward\.bingo\.lambda_c: must be >= 0, got -1\.0"):
        _build(BingoConfig, {"lambda_c": -1}, "reward.bingo")
    with pytest.raises(ValueError, match=r"^reward\.bingo\.lamda_c: unknown key"):
        _build(BingoConfig, {"lamda_c": 1}, "reward.bingo")


# ----- ReferenceLengths -------------------------------------------------------------------


def test_reference_lengths_means_missing_and_json_round_trip(tmp_path):
    ref = ReferenceLengths()
    ref.add(3, 10, 4)
    ref.add(3, 20, 6)  # two reference responses: mean (15, 5)
    ref.add(7, torch.tensor(8), 0)
    assert len(ref) == 2 and 3 in ref and 5 not in ref
    assert ref.missing([3, 5, 7, 5, 9]) == [5, 9]
    sig, insig = ref.get([7, 3, 3])
    assert sig.tolist() == [8.0, 15.0, 15.0] and insig.tolist() == [0.0, 5.0, 5.0]
    with pytest.raises(KeyError, match="5"):
        ref.get([3, 5])
    with pytest.raises(ValueError, match=">= 0"):
        ref.add(1, -1, 0)

    path = tmp_path / "sub" / "reference_lengths.json"
    ref.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["reference_lengths.json"]  # no tmp
    loaded = ReferenceLengths.load(path)
    for a, b in zip(loaded.get([3, 7]), ref.get([3, 7])):
        assert torch.equal(a, b)
    loaded.add(3, 0, 2)  # sums and counts survive the round trip: mean over three responses
    assert loaded.get([3])[0].item() == pytest.approx(10.0)
    assert loaded.get([3])[1].item() == pytest.approx(4.0)

    path.write_text("{broken")
    with pytest.raises(ValueError, match="delete it"):
        ReferenceLengths.load(path)
