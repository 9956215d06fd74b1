"""Every parallel layout gives the single-process loss, gradients and post-step weights (fp32).

Micro-batches have different lengths (as after RPC truncation) and pass through Megatron's
real schedules (1F1B, interleaved), DDP, and the distributed optimizer.
"""

import pytest
import torch

from tests.conftest import random_batch
from tests.launcher import launch

LENGTHS = [24, 16, 32, 8]  # multiples of 2*cp*tp for every layout below
LAYOUTS = {
    "tp2": ({"tp": 2}, 2),
    "tp2_sp": ({"tp": 2, "sequence_parallel": True}, 2),
    "pp2": ({"pp": 2}, 2),
    "pp2_vpp2": ({"pp": 2, "vpp": 2}, 2),
    "cp2": ({"cp": 2}, 2),
    "tp2_pp2": ({"tp": 2, "pp": 2}, 4),
    "tp2_cp2_sp": ({"tp": 2, "cp": 2, "sequence_parallel": True}, 4),
    "dp2_distopt": ({"dp": 2}, 2),
    # Interleaved schedule with context parallel: its fixed p2p shape is s / cp per rank.
    "pp2_vpp2_cp2": ({"pp": 2, "vpp": 2, "cp": 2}, 4),
}
# Layouts of one world size that share one launch (start-up dominates a launch).
BATCHED = [("tp2_pp2", "pp2_vpp2_cp2")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def reference(tiny_hf):
    hf = tiny_hf("qwen3", True)
    tokens, weights = random_batch(len(LENGTHS), 2, max(LENGTHS), 300, seed=1)
    kw = dict(hf_dir=hf, tokens=tokens, weights=weights, lengths=LENGTHS)
    return kw, launch("tests.parallel.workers:run_layout", 1, layout={}, **kw)[0]


@pytest.fixture(scope="module")
def results(reference):
    """name -> rank 0's result, launching each layout (or its batch) once."""
    kw, _ = reference
    cache = {}

    def get(name):
        if name not in cache:
            names = next((b for b in BATCHED if name in b), (name,))
            runs = [{"layout": LAYOUTS[n][0], "distributed_optimizer": n.endswith("distopt")} for n in names]
            got = launch("tests.parallel.workers:run_layouts", LAYOUTS[name][1], runs=runs, **kw)[0]
            cache.update(zip(names, got))
        return cache[name]

    return get


@pytest.mark.dist
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(reference, results, name):
    _, ref = reference
    got = results(name)
    assert abs(got["loss"] - ref["loss"]) / abs(ref["loss"]) <= 1e-5, (got["loss"], ref["loss"])
    assert ("grads" in got) == (not name.endswith("distopt"))
    if "grads" in got:
        assert got["grads"].keys() == ref["grads"].keys()
        for k, g in got["grads"].items():
            assert rel(g, ref["grads"][k]) <= 1e-5, f"{name}: grad {k} rel diff {rel(g, ref['grads'][k])}"
    assert got["update"].keys() == ref["update"].keys()
    for k, u in got["update"].items():
        assert rel(u, ref["update"][k]) <= 1e-5, f"{name}: optimizer update of {k} rel diff {rel(u, ref['update'][k])}"
