"""Parallel layout rules, process-group set-up and the CPU device-compatibility layer."""
