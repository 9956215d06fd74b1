"""Bad dataset rows at the trainer level: the trainer's config -> data path (load_dataset with the
model's tokenizer and chat template, as Trainer.__init__ calls it) skips and counts bad rows, the
Trainer reports them and does not crash, and a dataset left empty fails with a clear error."""

import json

import pytest

from nat_megatron.config import load_config
from nat_megatron.data import load_dataset
from tests.launcher import launch
from tests.train.workers import CONFIG, tiny_overrides

GOOD = [
    {"prompt": "What is 2 + 3?", "answer": "5"},
    {"prompt": "What is 7 * 6?", "answer": "42"},
    {"prompt": "What is 10 - 4?", "answer": "6"},
]
BAD = [
    {"prompt": "no answer here"},  # missing field
    {"answer": "3"},  # missing field
    {"prompt": "", "answer": "1"},  # empty prompt
    {"prompt": "   ", "answer": "1"},  # blank prompt
    {"prompt": "numeric answer", "answer": 4},  # non-string answer
    {"prompt": "list answer", "answer": ["5"]},
]  # non-string answer
EXPECTED_SKIPS = {"missing_answer": 1, "missing_prompt": 1, "empty_prompt": 2, "non_string_answer": 2}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def trainer_dataset(hf_dir, tmp_path, path, *more):
    """What Trainer.__init__ does with its config's data section (the same call)."""
    from transformers import AutoTokenizer

    cfg = load_config(CONFIG, tiny_overrides(hf_dir, str(tmp_path), **{"data.path": path}) + list(more))
    return load_dataset(cfg.data, AutoTokenizer.from_pretrained(cfg.model.weights_dir()))


def test_bad_rows_are_counted_not_fatal(tiny_smollm2, tmp_path):
    rows = [BAD[0], GOOD[0], BAD[1], BAD[2], GOOD[1], BAD[3], BAD[4], GOOD[2], BAD[5]]
    ds = trainer_dataset(tiny_smollm2, tmp_path, write(tmp_path / "mixed.jsonl", rows))
    assert [e.answer for e in ds.examples] == ["5", "42", "6"]
    assert dict(ds.skipped) == EXPECTED_SKIPS
    assert all(e.prompt_ids and e.prompt_ids[-1] != e.prompt_ids[0] for e in ds.examples)  # chat-templated


def test_empty_after_filtering_names_the_data_key(tiny_smollm2, tmp_path):
    path = write(tmp_path / "all_bad.jsonl", BAD)
    with pytest.raises(ValueError) as err:
        trainer_dataset(tiny_smollm2, tmp_path, path)
    msg = str(err.value)
    assert "no usable rows" in msg and path in msg and "data." in msg, msg
    for reason in EXPECTED_SKIPS:  # the counts say why
        assert reason in msg, msg


def test_all_prompts_too_long_names_max_prompt_tokens(tiny_smollm2, tmp_path):
    path = write(tmp_path / "long.jsonl", [{"prompt": "word " * 200, "answer": "1"}, BAD[2]])
    with pytest.raises(ValueError, match="data.max_prompt_tokens"):
        trainer_dataset(tiny_smollm2, tmp_path, path)


@pytest.mark.dist
def test_trainer_reports_skipped_rows_and_trains_on_the_rest(tiny_smollm2, tmp_path):
    rows = [BAD[0], GOOD[0], BAD[1], BAD[2], GOOD[1], BAD[3], BAD[4], GOOD[2], BAD[5]]
    res = launch(
        "tests.train.workers:trainer_data",
        1,
        timeout=180,
        hf_dir=tiny_smollm2,
        tmp=str(tmp_path),
        data_path=write(tmp_path / "mixed.jsonl", rows),
    )[0]
    assert f"data: skipped rows by reason: {EXPECTED_SKIPS}" in res["stdout"] or all(
        f"'{k}': {v}" in res["stdout"] for k, v in EXPECTED_SKIPS.items()
    ), res["stdout"]
    assert res["examples"] == 3
    assert len(res["batch_answers"]) == 2 and set(res["batch_answers"]) <= {"5", "42", "6"}, res
