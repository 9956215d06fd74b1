"""`python -m nat_megatron.train --config FILE [--dry-run] key=value ...` (see nat_megatron/cli.py)."""

import sys

from nat_megatron.cli import main

sys.exit(main())
