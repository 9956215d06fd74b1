"""Bad bytes never stop a load: every line is an example or a counted, located skip.
Parquet in the GSM8K layout, duplicate ids, reference answers the reward cannot use, and a
resume on changed data."""

from __future__ import annotations

import json
import random

import pytest

from nat_megatron.data import DataIterator, DatasetConfig, load_dataset, read_examples
from nat_megatron.data.readers import read_jsonl


def test_bad_utf8_deep_nesting_and_huge_lines_are_counted_with_file_and_line(tmp_path):
    path = tmp_path / "rough.jsonl"
    lines = [
        json.dumps({"prompt": "ok", "answer": "1"}).encode(),
        b'{"prompt": "caf\xe9", "answer": "2"}',  # latin-1, not UTF-8
        b"[" * 200_000 + b"]" * 200_000,  # past the recursion limit
        json.dumps({"prompt": "x" * 300, "answer": "3"}).encode(),
        json.dumps({"prompt": "also ok", "answer": "4", "id": 7}).encode(),
        json.dumps({"prompt": "same id", "answer": "5", "id": 7}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    ds = read_examples(path, layout="generic")
    assert [e.answer for e in ds.examples] == ["1", "3", "4"]
    assert dict(ds.skipped) == {"invalid_utf8": 1, "too_deep": 1, "duplicate_id": 1}
    assert ds.problems == [f"{path}:2: invalid_utf8", f"{path}:3: too_deep", f"{path}:6: duplicate_id"]
    assert f"{path}:3: too_deep" in ds.report()
    # a line over the reader's limit is skipped without being kept in memory, and counted
    rows = list(read_jsonl(path, max_line_bytes=1000))
    assert [getattr(r, "reason", None) for _, r in rows] == [None, "invalid_utf8", "line_too_long", None, None, None]
    assert [n for n, _ in rows] == [1, 2, 3, 4, 5, 6]


def test_exact_int_reward_needs_integer_reference_answers(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"prompt": "a", "answer": "12"},
        {"prompt": "b", "answer": "\\frac{1}{2}"},
        {"prompt": "c", "answer": "-3"},
        {"prompt": "d", "answer": "2.5"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from nat_megatron.train.prompts import load_dataset as trainer_prompts

    ds = trainer_prompts(DatasetConfig(path=str(path)), reward="exact_int")
    assert [e.answer for e in ds.examples] == ["12", "-3"]
    assert dict(ds.skipped) == {"answer_not_int": 2}
    assert ds.problems == [f"{path}:2: answer_not_int", f"{path}:4: answer_not_int"]
    assert len(trainer_prompts(DatasetConfig(path=str(path)), reward="math_verify")) == 4


def test_parquet_in_the_gsm8k_layout(tmp_path):
    """GSM8K as distributed: a Parquet file with `question` and `answer` (worked solution, then
    '#### N'), several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    questions = [f"Natalia sold clips to {n} friends. How many clips?" for n in range(10)]
    answers = [f"She sold {n} * 2 = <<{n}*2={2 * n}>>{2 * n} clips.\n#### {2 * n:,}" for n in range(10)]
    answers[3] = "no final answer here"
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"question": questions, "answer": answers}), path, row_group_size=4)
    assert pq.ParquetFile(path).num_row_groups == 3
    ds = load_dataset(DatasetConfig(path=str(path)))
    assert ds.layout == "gsm8k" and len(ds) == 9
    assert [e.answer for e in ds.examples][:3] == ["0", "2", "4"] and ds.examples[-1].answer == "18"
    assert ds.examples[0].question == questions[0]
    assert ds.problems == [f"{path}:4: no_final_answer"]


def test_fuzz_jsonl_reader_accounts_for_every_line(tmp_path):
    """Random bytes, deep nesting, huge and odd lines: no exception, and every non-blank line
    is either an example or a counted skip."""
    rng = random.Random(1234)
    good = lambda i: json.dumps({"prompt": f"p{i}", "answer": str(i), "id": i}).encode()  # noqa: E731
    makers = [
        lambda i: good(i),
        lambda i: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b""),
        lambda i: b"[" * rng.randrange(1, 100_000) + b"]" * rng.randrange(0, 3),
        lambda i: b'{"prompt": ' * rng.randrange(1, 50_000),
        lambda i: json.dumps({"prompt": "x" * rng.randrange(100_000, 2_000_000), "answer": "1"}).encode(),
        lambda i: good(i)[: rng.randrange(1, 20)],
        lambda i: good(i).replace(b"p", bytes([rng.choice([0x80, 0xC3, 0xFF, 0xED])])),
        lambda i: json.dumps({"prompt": "dup", "answer": "1", "id": rng.randrange(5)}).encode(),
        lambda i: b"1" * rng.randrange(1, 10_000),  # bare numbers, some past the digit limit
        lambda i: json.dumps([{"prompt": "a", "answer": "1"}]).encode(),
        lambda i: b"\x00\r\t " + good(i),
    ]
    for trial in range(3):
        lines = [good(-1)] + [rng.choice(makers)(i) for i in range(300)]
        path = tmp_path / f"fuzz{trial}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        ds = read_examples(path, layout="generic")
        non_blank = sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
        assert len(ds) + sum(ds.skipped.values()) == non_blank, (dict(ds.skipped), len(ds), non_blank)
        assert len({e.uid for e in ds.examples}) == len(ds)
        assert len(ds.problems) == min(20, sum(ds.skipped.values()))
        small = list(read_jsonl(path, max_line_bytes=4096))  # the over-long path, on the same file
        assert len(small) == non_blank


def test_resume_on_changed_data_needs_allow_changed():
    ds = load_dataset(DatasetConfig(size=20))
    it = DataIterator(ds, batch_size=3, seed=1)
    for _ in range(5):
        it.next_batch()
    state = it.state_dict()
    smaller = load_dataset(DatasetConfig(size=10, seed=4))
    with pytest.raises(ValueError, match="num_examples"):
        DataIterator(smaller, batch_size=3, seed=1).load_state_dict(state)
    moved = DataIterator(smaller, batch_size=3, seed=1)
    moved.load_state_dict(state, allow_changed=True)
    assert (moved.epoch, moved.position) == (state["epoch"], state["position"] % 10)
    assert len(moved.next_batch()) == 3


def test_damaged_parquet_is_a_named_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "gsm.parquet"
    pq.write_table(pa.table({"question": ["q"] * 50, "answer": ["#### 1"] * 50}), path)
    path.write_bytes(path.read_bytes()[:-40])  # the footer is gone
    with pytest.raises(ValueError, match=rf"^data.path: {path} is not a readable Parquet file"):
        read_examples(path)
