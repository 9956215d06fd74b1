"""Token significance for the Bingo length reward (nat.md §5): tokens -> keep-probabilities.

A scorer gives every token of a response a keep-probability in [0, 1]; a token whose
keep-probability is below the threshold (0.5) is *insignificant*. Bingo only needs the two
counts per response, `count_significant`, so a scorer may use its own tokenisation: the counts
are compared against the reference model's counts measured by the same scorer (bingo.py), and
the unit cancels in the ratios R_low = n_insig / n_insig_ref and R_high = n_sig / n_sig_ref.

Two scorers, both usable without a download at run time:
- "hf_token_classifier" (`HFTokenClassifierScorer`): an LLMLingua-2 style token classifier
  (e.g. a local copy of microsoft/llmlingua-2-xlm-roberta-large-meetingbank) loaded from a
  local directory. keep-prob = softmax(logits)[keep_label]; LLMLingua-2 labels 1 = preserve.
  Units: the classifier's own tokens of the decoded response text.
- "reference_proxy" (`ReferenceProxyScorer`): from the reference policy's forward pass,
  keep-prob_t = 1 - p_ref(y_t | y_<t) = 1 - exp(ref_logprob_t). Units: policy tokens.

    scorer = build_scorer("reference_proxy", None)
    probs = scorer.keep_probs(texts, token_ids, ref_logprobs)
    n_sig, n_insig = count_significant(probs, threshold=0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

SCORERS = ("reference_proxy", "hf_token_classifier")


@runtime_checkable
class SignificanceScorer(Protocol):
    """Maps a batch of responses to one 1-D float tensor of keep-probabilities each.

    `texts[i]` is response i decoded to text, `token_ids[i]` its policy token ids, and
    `ref_logprobs[i]` (or None) the reference policy's log-probability of each of those tokens
    (same length as `token_ids[i]`). A scorer uses what it needs; the returned tensors are in
    the scorer's own token units (their lengths need not match `token_ids`).
    """

    def keep_probs(
        self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], ref_logprobs: Sequence[Tensor] | None = None
    ) -> list[Tensor]: ...


def _check_batch(
    texts: Sequence[str], token_ids: Sequence[Sequence[int]], ref_logprobs: Sequence[Tensor] | None
) -> None:
    if len(texts) != len(token_ids):
        raise ValueError(f"got {len(texts)} texts but {len(token_ids)} token id lists; pass one of each per response")
    if ref_logprobs is not None and len(ref_logprobs) != len(texts):
        raise ValueError(
            f"got {len(texts)} responses but {len(ref_logprobs)} ref_logprobs; "
            "pass one reference log-prob tensor per response"
        )


class ReferenceProxyScorer:
    """keep-prob_t = 1 - p_ref(y_t | y_<t) = 1 - exp(ref_logprob_t), in policy tokens.

    Why this is a significance score: the self-information of a token under the reference
    model is -log2 p_ref(y_t). A token predicted with p_ref > 1/2 carries less than one bit,
    i.e. the model would have written it anyway; the original LLMLingua and selective-context
    compress a text by dropping exactly such low-self-information tokens. With the threshold
    0.5, keep-prob < 0.5 <=> p_ref > 0.5 <=> self-information < 1 bit: the proxy marks as
    insignificant the tokens those methods would drop. It costs nothing extra, since the
    trainer already runs the reference forward pass for the KL term, and needs no model file.
    """

    def keep_probs(
        self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], ref_logprobs: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        if ref_logprobs is None:
            raise ValueError(
                "reward.bingo.scorer: 'reference_proxy' scores tokens by the reference model's "
                "log-probabilities, but ref_logprobs is None; pass the reference policy's "
                "per-token log-probs of each response (or use scorer 'hf_token_classifier')"
            )
        _check_batch(texts, token_ids, ref_logprobs)
        out = []
        for i, (ids, lp) in enumerate(zip(token_ids, ref_logprobs)):
            lp = torch.as_tensor(lp).detach().float().reshape(-1)
            if lp.numel() != len(ids):
                raise ValueError(
                    f"response {i}: {len(ids)} tokens but {lp.numel()} reference "
                    "log-probs; pass one log-prob per response token (no padding)"
                )
            # -expm1(lp) = 1 - exp(lp) without cancellation for lp near 0; a log-prob cannot
            # exceed 0, so clamp rounding noise (e.g. bf16) that would give keep-prob < 0.
            out.append(-torch.expm1(lp.clamp(max=0.0)))
        return out


class HFTokenClassifierScorer:
    """LLMLingua-2 style token classifier from a local directory: keep-prob = P(keep_label).

    The response text is re-tokenised with the classifier's own (fast) tokenizer and cut into
    windows of at most `max_length` tokens including the special tokens (no token is dropped:
    a long response gives several windows, each scored on its own, as LLMLingua-2 does for long
    prompts). Special and padding tokens get no keep-prob, so the result has one value per
    content token of the classifier. Inference runs in eval mode under torch.no_grad.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        max_length: int = 512,
        keep_label: int = 1,
        batch_size: int = 8,
    ):
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        if path is None or not Path(path).is_dir():
            raise ValueError(
                f"reward.bingo.scorer_path: {path!r} is not a directory; put there a local copy "
                "of an LLMLingua-2 style token-classification model (config.json, weights and "
                "tokenizer files, e.g. microsoft/llmlingua-2-xlm-roberta-large-meetingbank "
                "downloaded beforehand), or use scorer 'reference_proxy' which needs no model"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModelForTokenClassification.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"reward.bingo.scorer_path: cannot load a token-classification model and tokenizer from {path}: {e}"
            ) from None
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                f"reward.bingo.scorer_path: the tokenizer in {path} is not a fast "
                "tokenizer; save it with its tokenizer.json (windowing needs one)"
            )
        n_labels = self.model.config.num_labels
        if not 0 <= keep_label < n_labels:
            raise ValueError(f"keep_label must be in [0, {n_labels}) for the model in {path}, got {keep_label}")
        n_special = self.tokenizer.num_special_tokens_to_add(pair=False)
        if max_length <= n_special:
            raise ValueError(
                f"max_length must exceed the {n_special} special tokens the tokenizer adds, got {max_length}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.max_length, self.keep_label, self.batch_size = max_length, keep_label, batch_size

    def keep_probs(
        self,
        texts: Sequence[str],
        token_ids: Sequence[Sequence[int]] | None = None,
        ref_logprobs: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        if token_ids is not None:
            _check_batch(texts, token_ids, None)
        if not texts:
            return []
        # Overflowing windows: a text longer than max_length becomes several rows, each with
        # its own special tokens; overflow_to_sample_mapping says which text a row belongs to.
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            stride=0,
            return_overflowing_tokens=True,
            return_special_tokens_mask=True,
            padding=True,
            return_tensors="pt",
        )
        owner = enc["overflow_to_sample_mapping"].tolist()
        content = (enc["special_tokens_mask"] == 0) & (enc["attention_mask"] == 1)
        pieces: list[list[Tensor]] = [[] for _ in texts]
        with torch.no_grad():
            for lo in range(0, len(owner), self.batch_size):
                rows = slice(lo, lo + self.batch_size)
                mask = enc["attention_mask"][rows]
                width = int(mask.sum(1).max())  # trim the batch's padding columns
                inputs = {
                    k: enc[k][rows, :width].to(self.device)
                    for k in ("input_ids", "attention_mask", "token_type_ids")
                    if k in enc
                }
                logits = self.model(**inputs).logits.float()
                probs = torch.softmax(logits, dim=-1)[..., self.keep_label].cpu()
                for j in range(probs.shape[0]):
                    row = lo + j
                    pieces[owner[row]].append(probs[j][content[row, :width]])
        # Rows of one text come out in order, so concatenation restores the token order.
        return [torch.cat(p) if p else torch.zeros(0) for p in pieces]


def count_significant(keep_probs: Sequence[Tensor], threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """(n_sig, n_insig) per response, LongTensor[B] each; insignificant: keep-prob < threshold."""
    if not 0 <= threshold <= 1 or math.isnan(threshold):
        raise ValueError(f"reward.bingo.threshold: must be in [0, 1], got {threshold}")
    n_insig = torch.tensor([int((torch.as_tensor(p) < threshold).sum()) for p in keep_probs], dtype=torch.long)
    n_all = torch.tensor([torch.as_tensor(p).numel() for p in keep_probs], dtype=torch.long)
    return n_all - n_insig, n_insig


def build_scorer(
    name: str, path: str | Path | None = None, *, device: str | torch.device = "cpu"
) -> SignificanceScorer:
    """The scorer named by `reward.bingo.scorer`; `path` is `reward.bingo.scorer_path`."""
    if name == "reference_proxy":
        return ReferenceProxyScorer()
    if name == "hf_token_classifier":
        return HFTokenClassifierScorer(path, device=device)
    raise ValueError(f"reward.bingo.scorer: unknown scorer {name!r}; use one of {list(SCORERS)}")
