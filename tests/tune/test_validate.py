"""--validate on CPU: the memory model predicts the measured peak of the real code within 30%.

Five short runs of the tiny preset (fp32, gloo, 1-2 processes, 2 steps; the peak is taken in
step 2, over ranks): single process, PP2 (1F1B), TP2 with sequence parallel, PP2 with NAT RPC
at budget 0.5 (real cuts from nat/selection.py, grouped by train/batching.py), and DP2 with full
recompute and the distributed optimizer. All use the selected-position output layer.
"""

import pytest

from nat_megatron.model.presets import load_arch
from nat_megatron.parallel.layout import Layout
from nat_megatron.tune.memory import Plan
from nat_megatron.tune.validate import format_rows, validate_plans
from nat_megatron.tune.workload import Workload

CASES = [
    (Plan(Layout(), 4, "none"), "none", 1.0),
    (Plan(Layout(pp=2), 4, "none"), "none", 1.0),
    (Plan(Layout(tp=2, sequence_parallel=True), 4, "none"), "none", 1.0),
    (Plan(Layout(pp=2), 4, "none"), "rpc", 0.5),
    (Plan(Layout(dp=2), 4, "full"), "none", 1.0),
]


@pytest.mark.slow
@pytest.mark.dist
def test_memory_model_predicts_the_measured_peak_on_cpu():
    arch = load_arch("tiny")
    rows = []
    for plan, nat, budget in CASES:
        work = Workload(seq_len=128, response_len=96, global_batch=16, nat=nat, budget=budget)
        rows += validate_plans(arch, work, [plan], steps=2)
    print("\n" + format_rows(rows))
    for r in rows:
        assert abs(r["mem_error"]) <= 0.30, format_rows([r])
