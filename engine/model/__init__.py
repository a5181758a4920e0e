"""Reading models: checkpoints, the forward, the KV cache."""
