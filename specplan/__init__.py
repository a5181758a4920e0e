"""specplan: profile a machine, plan offloaded speculative LLM inference, simulate it, run it, compare."""

__version__ = "0.1.0"
