"""
OTB with small groups vs GRPO with small and large groups: reward per token used.

Three arms on examples/configs/smollm2-135m-cpu.yaml (NAT as in that config), same seed and
steps, train.prompts_per_step=2 by default:
    g4_otb  rollout.group_size=4  advantage.estimator=otb
    g4      rollout.group_size=4  advantage.estimator=grpo
    g16     rollout.group_size=16 advantage.estimator=grpo (4x the tokens per step)

    .venv/bin/python examples/otb_group_size/run.py [--steps 10] [--out runs/otb_group_size] [key=value ...]
    .venv/bin/python examples/otb_group_size/run.py --plot-only   # re-plot existing runs

Writes <out>/<arm>/{tb,checkpoints,train.log,arm.json}, <out>/summary.json, <out>/compare.png
(the right panel, reward vs cumulative trained tokens, is the comparison that matters here).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compare import Arm, main  # noqa: E402

ARMS = [
    Arm("g4_otb", ["rollout.group_size=4", "advantage.estimator=otb"]),
    Arm("g4", ["rollout.group_size=4", "advantage.estimator=grpo"]),
    Arm("g16", ["rollout.group_size=16", "advantage.estimator=grpo"]),
]

if __name__ == "__main__":
    # base overrides come before the command line's, so `train.prompts_per_step=4` still wins
    sys.exit(
        main(
            ARMS,
            description=__doc__.strip().splitlines()[0],
            default_out="runs/otb_group_size",
            default_steps=10,
            base_overrides=["train.prompts_per_step=2"],
        )
    )
