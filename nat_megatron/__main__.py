"""`python -m nat_megatron COMMAND ...`: the `nat-megatron` console script (nat_megatron/cli.py)."""

import sys

from nat_megatron.cli import console

sys.exit(console())
