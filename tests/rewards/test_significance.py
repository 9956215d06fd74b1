"""Token significance scorers: a tiny local LLMLingua-2 style classifier and the reference proxy."""

from __future__ import annotations

import math

import pytest
import torch

from nat_megatron.rewards.significance import (
    HFTokenClassifierScorer,
    ReferenceProxyScorer,
    SignificanceScorer,
    build_scorer,
    count_significant,
)

WORDS = "the a cat dog sat on mat and ran far so 1 2 3 + = is answer".split()


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A random 2-layer BERT token classifier (2 labels) with a word-level fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("llmlingua_tiny")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # one token per word: counts are predictable
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    BertForTokenClassification(cfg).save_pretrained(path)
    return str(path)


TEXTS = ["the cat sat on the mat", "so 1 + 2 = 3 is the answer", "", "dog"]


def test_hf_scorer_one_prob_per_content_token(tiny_classifier):
    scorer = HFTokenClassifierScorer(tiny_classifier, batch_size=3)
    assert isinstance(scorer, SignificanceScorer)
    probs = scorer.keep_probs(TEXTS, [[0]] * len(TEXTS), None)
    assert [p.numel() for p in probs] == [len(t.split()) for t in TEXTS]  # no [CLS]/[SEP]/pad
    for p in probs:
        assert p.dtype == torch.float32 and ((p >= 0) & (p <= 1)).all()
    again = scorer.keep_probs(TEXTS, [[0]] * len(TEXTS), None)
    assert all(torch.equal(a, b) for a, b in zip(probs, again))  # deterministic (eval, no dropout)
    assert not scorer.model.training


def test_hf_scorer_matches_a_manual_forward(tiny_classifier):
    scorer = HFTokenClassifierScorer(tiny_classifier)
    text = "the cat sat on the mat"
    enc = scorer.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        manual = torch.softmax(scorer.model(**enc).logits, -1)[0, 1:-1, 1]
    got = scorer.keep_probs([text], [[0]])[0]
    torch.testing.assert_close(got, manual)
    # keep_label 0 gives the complementary probability with two labels
    other = HFTokenClassifierScorer(tiny_classifier, keep_label=0).keep_probs([text], [[0]])[0]
    torch.testing.assert_close(other, 1 - got)


def test_hf_scorer_windows_long_texts_without_dropping_tokens(tiny_classifier):
    # max_length 5 = [CLS] + 3 words + [SEP]: 10 words become 4 windows, each scored alone
    scorer = HFTokenClassifierScorer(tiny_classifier, max_length=5, batch_size=2)
    words = "the cat sat on the mat and ran far so".split()
    got = scorer.keep_probs([" ".join(words), "dog"], [[0], [0]])
    assert got[0].numel() == 10 and got[1].numel() == 1
    for lo in range(0, 10, 3):
        alone = scorer.keep_probs([" ".join(words[lo : lo + 3])], [[0]])[0]
        torch.testing.assert_close(got[0][lo : lo + 3], alone)


def test_hf_scorer_missing_path_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"^reward\.bingo\.scorer_path: .*not a directory.*put"):
        HFTokenClassifierScorer(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"^reward\.bingo\.scorer_path: cannot load"):
        HFTokenClassifierScorer(tmp_path)  # exists but holds no model
    with pytest.raises(ValueError, match=r"^reward\.bingo\.scorer_path"):
        build_scorer("hf_token_classifier", None)


def test_reference_proxy_is_one_minus_reference_prob():
    lps = [torch.tensor([0.0, math.log(0.4), math.log(0.9), -30.0]), torch.tensor([1e-7])]
    probs = ReferenceProxyScorer().keep_probs(["a", "b"], [[1, 2, 3, 4], [5]], lps)
    torch.testing.assert_close(probs[0], 1 - torch.exp(lps[0]))
    assert probs[1].item() == 0.0  # a rounding-positive log-prob clamps to keep-prob 0, not < 0
    n_sig, n_insig = count_significant(probs)
    # p_ref = 1 and p_ref = 0.9 carry < 1 bit: insignificant; p_ref = 0.4 and e^-30 are kept
    assert n_sig.tolist() == [2, 0] and n_insig.tolist() == [2, 1]


def test_reference_proxy_needs_logprobs_of_matching_length():
    scorer = build_scorer("reference_proxy", None)
    with pytest.raises(ValueError, match="ref_logprobs is None"):
        scorer.keep_probs(["a"], [[1]], None)
    with pytest.raises(ValueError, match="one log-prob per response token"):
        scorer.keep_probs(["a"], [[1, 2]], [torch.zeros(3)])


def test_count_significant():
    n_sig, n_insig = count_significant([torch.tensor([0.1, 0.6, 0.5, 0.49]), torch.zeros(0), torch.tensor([0.9])])
    assert n_sig.dtype == n_insig.dtype == torch.long
    assert n_sig.tolist() == [2, 0, 1] and n_insig.tolist() == [2, 0, 0]
    assert count_significant([torch.tensor([0.1, 0.6])], threshold=0.05)[1].tolist() == [0]


def test_build_scorer_names(tiny_classifier):
    assert isinstance(build_scorer("reference_proxy", None), ReferenceProxyScorer)
    assert isinstance(build_scorer("hf_token_classifier", tiny_classifier), HFTokenClassifierScorer)
    with pytest.raises(
        ValueError,
        match=r"^reward\.bingo\.scorer: unknown scorer 'x'.*"
        r"reference_proxy.*hf_token_classifier",
    ):
        build_scorer("x", None)
