"""Run a function on N gloo ranks, each a fresh Python process, and collect what it returns.

    results = launch("tests.parallel.workers:run_layout", nprocs=4, layout=..., ...)

A thin name for nat_megatron.parallel.launch.launch_function: every rank calls the function
with the same keyword arguments; a failing rank (or a hang) raises with every rank's output.
"""

from nat_megatron.parallel.launch import ROOT
from nat_megatron.parallel.launch import launch_function as launch

__all__ = ["ROOT", "launch"]
