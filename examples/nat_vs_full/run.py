"""
NAT vs full GRPO on the default CPU job: does training on half the tokens learn as fast?

Three arms on examples/configs/smollm2-135m-cpu.yaml, same seed and steps:
    full  nat.scheme=none (every generated token enters the policy gradient)
    urs   nat.scheme=urs  nat.budget=0.5 (uniform random half of the tokens)
    rpc   nat.scheme=rpc  nat.budget=0.5 (random prefix cutting, shorter forward/backward)

    .venv/bin/python examples/nat_vs_full/run.py [--steps 20] [--seeds 0,1] [--out runs/nat_vs_full] [key=value ...]
    .venv/bin/python examples/nat_vs_full/run.py --plot-only   # re-plot existing runs

Every run evaluates greedy pass@1 on the 256 held-out problems before the first step and every
10 steps (eval.every=10). Writes <out>/<arm>/seed<k>/{tb,checkpoints,train.log,arm.json},
<out>/summary.json, <out>/compare.png.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compare import Arm, main  # noqa: E402

ARMS = [
    Arm("full", ["nat.scheme=none", "nat.budget=1"]),  # scheme none requires budget 1
    Arm("urs", ["nat.scheme=urs", "nat.budget=0.5"]),
    Arm("rpc", ["nat.scheme=rpc", "nat.budget=0.5"]),
]

if __name__ == "__main__":
    sys.exit(
        main(
            ARMS,
            description=__doc__.strip().splitlines()[0],
            default_out="runs/nat_vs_full",
            default_steps=20,
            default_seeds="0,1",
            base_overrides=["eval.every=10"],
        )
    )
