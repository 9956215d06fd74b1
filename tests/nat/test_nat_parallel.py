"""NAT through Megatron: every layout gives the single-process loss and gradients (fp32).

One launch per layout (PP2, CP2, TP2+SP, TP2xPP2 together with PP2xVPP2xCP2, and PP2
interleaved) runs every check (tests/nat/workers.py:nat_checks): RPC (truncated
compute, micro-batches of different lengths, some samples skipped at cut 0) and URS, both with
the selected-position output layer; the selected logits against the full output path; and the
same selection on every rank. The single-process run also checks that scheme "none" through
batching + the NAT loss equals plain GRPO built without batching.py.
"""

import pytest
import torch

from tests.launcher import launch
from tests.nat.workers import CHECKS

LAYOUTS = {
    "pp2": ({"pp": 2}, 2),
    "cp2": ({"cp": 2}, 2),
    "tp2_sp": ({"tp": 2, "sequence_parallel": True}, 2),
    "tp2_pp2": ({"tp": 2, "pp": 2}, 4),
    "pp2_vpp2": ({"pp": 2, "vpp": 2}, 2),  # one shape per step: rows and lengths padded
    # Interleaved + context parallel, with 3 micro-batches: the schedule's groups of pp are
    # completed by a zero-weight micro-batch.
    "pp2_vpp2_cp2": ({"pp": 2, "vpp": 2, "cp": 2}, 4, 3),
}
BATCHED = [("tp2_pp2", "pp2_vpp2_cp2")]  # one 4-rank launch runs both
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close(got: dict, ref: dict, what: str):
    assert abs(got["loss"] - ref["loss"]) <= TOL * abs(ref["loss"]), (what, got["loss"], ref["loss"])
    assert got["grads"].keys() == ref["grads"].keys()
    for k, g in got["grads"].items():
        assert rel(g, ref["grads"][k]) <= TOL, f"{what}: grad {k} rel diff {rel(g, ref['grads'][k])}"


def check_common(res: dict, nprocs: int):
    assert len(res["selection_digests"]) == nprocs
    assert len(set(res["selection_digests"])) == 1, res["selection_digests"]
    assert res["shapes_equal"]
    assert 0 in res["rpc_cuts"] and len(set(res["rpc_seq_lens"])) > 1, res  # skip + variety
    sel = res["selected_vs_full"]
    assert sel["positions"] > 0
    assert sel["logits"] <= TOL and sel["logprobs"] <= TOL, sel
    assert res["guarded_gather_equal"]  # gather_full keeps grads on device for collectives
    # URS through the selected last layer equals the full model at the kept positions.
    assert_close(res["urs_full_path"], res["checks"]["urs"], "urs: full path vs selected path")
    # Selected count padded as under MXFP8 (32 per TP rank): zero-weight rows change nothing.
    assert_close(res["rpc_pad_fp8"], res["checks"]["rpc"], "selected count padded as under MXFP8")
    # A group's responses in one row behind their shared prompt (parallel.share_prompt, cp=1
    # only): the same loss and gradients as a row each.
    for check, (own_rows, shared) in res.get("shared", {}).items():
        assert_close(shared, own_rows, f"share_prompt {check}")


@pytest.fixture(scope="module")
def reference(tiny_hf):
    hf = tiny_hf("qwen3", True)
    res = launch("tests.nat.workers:nat_checks", 1, layout={}, hf_dir=hf, plain=True)[0]
    return hf, res


@pytest.mark.dist
def test_single_process(reference):
    _, ref = reference
    check_common(ref, 1)
    assert set(ref["shared"]) == {"rpc", "urs", "rpc_full"}
    for name in CHECKS:
        assert ref["checks"][name]["loss"] != 0.0
        assert any(g.abs().max() > 0 for g in ref["checks"][name]["grads"].values())
    # The OTB proxy pass filled exactly the prefixes asked for, some beyond the RPC cuts.
    st = ref["otb_stats"]
    filled = (st["sum_p2"] > 0).sum(1)
    assert torch.equal(filled, st["prefix"]), (filled, st["prefix"])
    assert ref["otb"]["loss"] != 0.0
    # scheme "none" through batching.py and nat_loss_fn is plain GRPO.
    assert_close(ref["none"], ref["plain"], "none vs plain GRPO")
    assert_close(ref["urs_full_recompute"], ref["checks"]["urs"], "urs under full recompute")


@pytest.fixture(scope="module")
def results(reference):
    """name -> rank 0's result, launching each layout (or its batch) once."""
    hf, _ = reference
    cache = {}

    def get(name):
        if name not in cache:
            names = next((b for b in BATCHED if name in b), (name,))
            runs = [{"layout": LAYOUTS[n][0], "micro_batches": (LAYOUTS[n] + (4,))[2]} for n in names]
            got = launch("tests.nat.workers:nat_checks_layouts", LAYOUTS[name][1], runs=runs, hf_dir=hf)[0]
            cache.update(zip(names, got))
        return cache[name]

    return get


@pytest.mark.dist
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(reference, results, name):
    _, ref = reference
    nprocs = LAYOUTS[name][1]
    got = results(name)
    check_common(got, nprocs)
    # The selection does not depend on the layout (nor on the process).
    assert got["selection_digests"][0] == ref["selection_digests"][0]
    for check in CHECKS:
        assert_close(got["checks"][check], ref["checks"][check], f"{name} {check}")
    # OTB: the proxy pass and the per-token-advantage loss match one process too.
    for k in ("logprobs", "sum_p2"):
        assert (got["otb_stats"][k] - ref["otb_stats"][k]).abs().max() <= TOL, (name, k)
    assert_close(got["otb"], ref["otb"], f"{name} otb")
    # Two mini-batches, two optimizer steps, KL on: the same weight updates as one process.
    check_updates(got["two_updates"], ref["two_updates"], name)


def check_updates(got: dict, ref: dict, what: str):
    # The gradients of both updates, the second at the weights the first step made...
    for i, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
        for k in r:
            assert rel(g[k], r[k]) <= TOL, f"{what}: update {i + 1} grad {k} rel diff {rel(g[k], r[k])}"
    # ...and the weights after both steps (every one moved; their fp32 rounding near 1 limits a
    # comparison of the small updates themselves, hence the gradients above).
    for k, w in ref["after"].items():
        assert (w - ref["before"][k]).abs().max() > 0, k
        assert rel(got["after"][k], w) <= TOL, f"{what}: weights {k} rel diff {rel(got['after'][k], w)}"
