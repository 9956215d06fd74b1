#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron-Core (torch_dist), and verify them:
`nat-megatron convert` (nat_megatron/convert_cli.py), run from a checkout.

    python tools/convert_checkpoint.py hf-to-mcore --hf DIR --out DIR --tp N --pp N [--vpp N]
    python tools/convert_checkpoint.py mcore-to-hf --mcore DIR --out DIR
    python tools/convert_checkpoint.py verify --hf DIR --mcore DIR --tp N --pp N
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nat_megatron.convert_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
