"""Parallel-layout tuner: memory and step-time estimates, the layout search, --validate.

`check_layout` is the entry point for the trainer's dry run: the layout rules themselves live
in parallel/layout.py (validate_layout); this adds the memory and time estimate.
"""

from nat_megatron.tune.search import Candidate, check_layout, search

__all__ = ["Candidate", "check_layout", "search"]
