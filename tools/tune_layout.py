#!/usr/bin/env python
"""Rank parallel layouts for a model and GPU count: `nat-megatron tune` (nat_megatron/tune/cli.py),
run from a checkout.

    python tools/tune_layout.py --model qwen3-8b --gpus 8 --seq-len 8192 --response-len 7168 --nat rpc:0.5
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nat_megatron.tune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
