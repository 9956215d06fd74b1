"""Rollouts: the colocated vLLM engine and the trainer-to-engine weight sync."""
