"""Datasets: layouts, bad-row accounting, templating and length filter, embedded set, iterator."""

import json
import re

import pytest

from nat_megatron.data import (
    DataIterator,
    DatasetConfig,
    arithmetic_examples,
    load_dataset,
    read_examples,
    readers,
    template_examples,
)
from nat_megatron.data.arithmetic import ONE_STEP, TWO_STEP


def write_jsonl(path, rows):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    """A real HF fast tokenizer with a ChatML template, built in memory (word-level, no files)."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    words = "system user assistant you are a helpful math solve the problem".split()
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    model = tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", additional_special_tokens=specials[1:]
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    return tok


# --- layouts ---------------------------------------------------------------------------------


def test_gsm8k_layout_autodetected(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm.jsonl",
        [
            {"question": "Two plus two?", "answer": "2+2=4\n#### 4"},
            {"question": "Big?", "answer": "lots\n#### 1,200"},
        ],
    )
    ds = read_examples(path)
    assert ds.layout == "gsm8k"
    assert [(e.question, e.answer) for e in ds.examples] == [("Two plus two?", "4"), ("Big?", "1200")]
    assert not ds.skipped


def test_math_layout_boxed_and_answer_field(tmp_path):
    path = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
            {"problem": "Nested?", "solution": "first \\boxed{1} then \\boxed{\\sqrt{x^{2}}}"},
            {"problem": "Given?", "solution": "no box here", "answer": "7"},
            {"problem": "No answer?", "solution": "nothing boxed"},
        ],
    )
    ds = read_examples(path)
    assert ds.layout == "math"
    assert [e.answer for e in ds.examples] == ["\\frac{1}{2}", "\\sqrt{x^{2}}", "7"]
    assert ds.skipped == {"no_final_answer": 1}


def test_generic_layout_explicit_and_ids(tmp_path):
    path = write_jsonl(
        tmp_path / "gen.jsonl",
        [
            {"prompt": "p1", "answer": "1", "id": "a"},
            {"prompt": "p2", "answer": "2"},
        ],
    )
    ds = read_examples(path, layout="generic")
    assert [e.uid for e in ds.examples] == ["gen:a", "gen:2"]


def test_bad_rows_counted_per_reason(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "ok", "answer": "1"},
            {"prompt": "no answer"},
            {"answer": "2"},
            {"prompt": "   ", "answer": "3"},
            {"prompt": "number", "answer": 4},
            {"prompt": "list", "answer": ["5"]},
            {"prompt": "blank", "answer": "  "},
            {"prompt": None, "answer": "6"},
            "[1, 2]",
            "{not json",
            {"prompt": "also ok", "answer": "\\frac{1}{2}"},
        ],
    )
    ds = read_examples(path)
    assert len(ds) == 2
    assert ds.skipped == {
        "missing_answer": 1,
        "missing_prompt": 2,
        "empty_prompt": 1,
        "non_string_answer": 2,
        "no_final_answer": 1,
        "not_an_object": 1,
        "invalid_json": 1,
    }


def test_empty_after_filtering_raises(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "", "answer": "1"}, {"prompt": "x", "answer": 2}])
    with pytest.raises(ValueError, match="no usable rows.*empty_prompt"):
        read_examples(path)


def test_unknown_layout_and_undetectable(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        DatasetConfig(layout="alpaca")
    path = write_jsonl(tmp_path / "odd.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(ValueError, match="cannot detect"):
        read_examples(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_examples(tmp_path / "missing.jsonl")


def test_parquet(tmp_path):
    import pyarrow as pa  # a dependency (requirements.txt)
    import pyarrow.parquet as pq

    path = tmp_path / "gsm.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["#### 3", "none"]}), path)
    ds = read_examples(path)
    assert [e.answer for e in ds.examples] == ["3"] and ds.skipped == {"no_final_answer": 1}


def test_parquet_missing_pyarrow_message(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(readers.read_parquet(path))


# --- templating ------------------------------------------------------------------------------


def test_chat_template_and_length_filter(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "g.jsonl",
        [
            {"prompt": "solve the problem", "answer": "1"},
            {"prompt": " ".join(["problem"] * 50), "answer": "2"},
        ],
    )
    ds = load_dataset(DatasetConfig(path=str(path), max_prompt_tokens=30), tokenizer)
    assert len(ds) == 1 and ds.skipped == {"too_long": 1}
    ex = ds.examples[0]
    assert ex.prompt.startswith("<|im_start|> system") and "\\boxed{" in ex.prompt
    assert ex.prompt.endswith("<|im_start|> assistant ")
    assert list(ex.prompt_ids) == tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        load_dataset(DatasetConfig(path=str(path), max_prompt_tokens=5), tokenizer)


def test_no_system_prompt_and_missing_template(tokenizer):
    examples = arithmetic_examples("test", size=2)
    kept, dropped = template_examples(examples, tokenizer, system_prompt=None)
    assert len(kept) == 2 and not dropped and "system" not in kept[0].prompt

    class Plain:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        template_examples(examples, Plain())


# --- embedded arithmetic set -----------------------------------------------------------------

NUM = r"(\d+)"
# One regex per template with its own formula: an independent check of the generator.
SOLVERS = [
    (rf"\w+ has {NUM} [a-z ]+?\. \w+ gets {NUM} more [a-z ]+?\. How many .* now\?", lambda a, b: a + b),
    (rf"\w+ has {NUM} [a-z ]+? and gives {NUM} of them to \w+\. How many .* left\?", lambda a, b: a - b),
    (rf"\w+ has {NUM} bags with {NUM} [a-z ]+? in each bag\. How many .*\?", lambda a, b: a * b),
    (rf"\w+ shares {NUM} [a-z ]+? equally among {NUM} friends\..*", lambda t, a: t // a if t % a == 0 else None),
    (rf"\w+ has {NUM} [a-z ]+?\. \w+ gets {NUM} more and then gives {NUM} to \w+\..*", lambda a, b, c: a + b - c),
    (rf"\w+ has {NUM} boxes with {NUM} [a-z ]+? in each box and {NUM} more .*", lambda a, b, c: a * b + c),
    (
        rf"One [a-z ]+? costs {NUM} dollars?\. \w+ buys {NUM} [a-z ]+? and pays with a {NUM} dollar bill\..*",
        lambda a, b, c: c - a * b,
    ),
    (rf"\w+ has {NUM} [a-z ]+?\. \w+ has {NUM} more [a-z ]+? than \w+\. .*together\?", lambda a, b: 2 * a + b),
]


def solve(question):
    results = [fn(*map(int, m.groups())) for pattern, fn in SOLVERS if (m := re.fullmatch(pattern, question))]
    assert len(results) == 1, f"{len(results)} solvers match {question!r}"
    return results[0]


def test_embedded_answers_are_right():
    assert len(SOLVERS) == len(ONE_STEP) + len(TWO_STEP)
    examples = arithmetic_examples("train", size=2000) + arithmetic_examples("test")
    for ex in examples:
        value = solve(ex.question)
        assert value is not None and value >= 0 and str(value) == ex.answer, ex


def test_embedded_is_deterministic_and_splits_disjoint():
    a = arithmetic_examples("train", size=300, seed=3)
    assert a == arithmetic_examples("train", size=300, seed=3)
    assert a != arithmetic_examples("train", size=300, seed=4)
    test = arithmetic_examples("test", seed=3)
    assert len(test) == 256 and len({e.question for e in a + test}) == 556
    assert len({e.uid for e in a + test}) == 556
    # Mostly small numbers: a 135M model should be able to learn these.
    assert max(int(e.answer) for e in a) <= 100
    ds = load_dataset(DatasetConfig(size=10, limit=4))
    assert len(ds) == 4 and ds.source.startswith("embedded")


# --- iterator --------------------------------------------------------------------------------


def test_iterator_covers_epochs_and_resumes_exactly():
    data = list(range(10))
    it = DataIterator(data, batch_size=4, seed=7)
    first_epoch = it.next_batch() + it.next_batch() + it.next_batch()[:2]
    assert sorted(first_epoch) == data and first_epoch != data  # shuffled permutation
    state = it.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    expected = [it.next_batch() for _ in range(5)]

    resumed = DataIterator(data, batch_size=4, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert [resumed.next_batch() for _ in range(5)] == expected
    again = DataIterator(data, batch_size=4, seed=7)
    assert again.next_batch() == first_epoch[:4]  # same seed, same order


def test_iterator_rejects_foreign_state_and_bad_args():
    ds = load_dataset(DatasetConfig(size=20))
    state = DataIterator(ds, batch_size=2, seed=1).state_dict()
    assert state["fingerprint"]
    with pytest.raises(ValueError, match="seed"):
        DataIterator(ds, batch_size=2, seed=2).load_state_dict(state)
    other = load_dataset(DatasetConfig(size=20, seed=5))
    with pytest.raises(ValueError, match="fingerprint"):
        DataIterator(other, batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="empty"):
        DataIterator([], batch_size=2)
    unshuffled = DataIterator(list(range(5)), batch_size=3, shuffle=False)
    assert unshuffled.next_batch() == [0, 1, 2] and unshuffled.next_batch() == [3, 4, 0]
