"""Moving bytes: O_DIRECT files, the offload file, prefetch, the tiered store."""
