"""Executing a plan: runtime, executor, speculative decoding, the measured timeline."""
