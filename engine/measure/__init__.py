"""Measuring the machine: links, compute, overheads (specplan profile)."""
