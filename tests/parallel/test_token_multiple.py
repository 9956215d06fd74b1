"""Token-count multiples (parallel/layout.py token_multiple) and the FP8 switches that use them.

The multiples are checked against a brute-force reference written from the rule itself: the
smallest length whose every per-rank share (after the CP and SP splits) is whole and, under
FP8, a multiple of Transformer Engine's GEMM alignment for the recipe.
"""

import itertools

import pytest
import torch

from nat_megatron.parallel.layout import FP8_ALIGN, Layout, token_multiple

LAYOUTS = [
    Layout(tp=tp, cp=cp, sequence_parallel=sp)
    for tp, cp, sp in itertools.product((1, 2, 3, 4, 8), (1, 2, 4), (False, True))
    if tp > 1 or not sp
]


def smallest_valid(layout: Layout, fp8: str | None, selected: bool) -> int:
    t = layout.tp if layout.sequence_parallel else 1
    align = FP8_ALIGN[fp8] if fp8 else 1
    for n in itertools.count(1):
        if selected:  # a CP rank's own selected rows, split over TP under SP
            ok = n % t == 0 and (n // t) % align == 0
        else:  # 2*cp load-balancing chunks; each rank's n/cp positions, split over TP under SP
            chunks = 2 * layout.cp if layout.cp > 1 else 1
            ok = n % (chunks * t) == 0 and (n // (layout.cp * t)) % align == 0
        if ok:
            return n


@pytest.mark.parametrize("fp8", [None, *FP8_ALIGN])
def test_multiples_match_the_per_rank_rule(fp8):
    for lay in LAYOUTS:
        for selected in (False, True):
            assert token_multiple(lay, fp8=fp8, selected=selected) == smallest_valid(lay, fp8, selected), (
                lay,
                fp8,
                selected,
            )


def test_examples_and_layout_seq_multiple():
    sp = dict(sequence_parallel=True)
    assert Layout(cp=2).seq_multiple == token_multiple(Layout(cp=2)) == 4
    assert token_multiple(Layout(tp=2, cp=2, **sp), fp8="delayed") == 64  # 16 per rank, not 16
    assert token_multiple(Layout(tp=3, **sp), fp8="tensorwise") == 48
    assert token_multiple(Layout(tp=2, cp=2), fp8="mxfp8") == 64  # no SP: s/cp per rank
    assert token_multiple(Layout(tp=4, cp=2, **sp), fp8="blockwise", selected=True) == 64
    assert token_multiple(Layout(tp=4, cp=2), fp8="mxfp8", selected=True) == 32
    with pytest.raises(ValueError, match="fp8 recipe 'fp4' is unknown"):
        token_multiple(Layout(), fp8="fp4")


def test_alignment_is_megatrons():
    """Our table is Megatron-Core's get_fp8_align_size, recipe by recipe, and names every
    recipe Megatron exposes except 'custom' (which needs a quantizer factory)."""
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    assert set(FP8_ALIGN) == {r.value for r in Fp8Recipe} - {"custom"}
    for recipe, align in FP8_ALIGN.items():
        assert get_fp8_align_size(Fp8Recipe(recipe)) == align


def test_fp8_reaches_the_transformer_config_and_needs_te():
    from nat_megatron.model.arch import ModelArch
    from nat_megatron.model.build import build_model, transformer_config
    from tests.conftest import TINY

    arch = ModelArch.from_hf_config(dict(TINY, model_type="llama"))
    cfg = transformer_config(arch, Layout(), dtype=torch.bfloat16, fp8="mxfp8")
    assert (cfg.fp8, cfg.fp8_recipe) == ("hybrid", "mxfp8")
    assert transformer_config(arch, Layout()).fp8 is None
    if not torch.cuda.is_available():  # this machine: no GPU, so no Transformer Engine
        with pytest.raises(
            ValueError,
            match=r"model.fp8='delayed' needs Transformer Engine on a "
            r"CUDA GPU, and this process has no GPU",
        ):
            build_model(arch, Layout(), fp8="delayed")


def test_forward_backward_names_an_unaligned_fp8_length():
    from types import SimpleNamespace

    from nat_megatron.train.forward_backward import MicroBatch, _check_fp8_lengths

    config = SimpleNamespace(
        fp8="hybrid",
        fp8_recipe="delayed",
        tensor_model_parallel_size=2,
        context_parallel_size=2,
        sequence_parallel=True,
    )
    mb = lambda s: MicroBatch(
        tokens=torch.zeros(1, s, dtype=torch.long),  # noqa: E731
        targets=torch.zeros(1, s, dtype=torch.long),
    )
    _check_fp8_lengths([SimpleNamespace(config=config)], [mb(64), mb(128)])
    with pytest.raises(ValueError, match=r"lengths \[16\] are not multiples of 64"):
        _check_fp8_lengths([SimpleNamespace(config=config)], [mb(64), mb(16)])
    config.fp8 = None  # without FP8 the layout's own multiple is the schedule's business
    _check_fp8_lengths([SimpleNamespace(config=config)], [mb(16)])
