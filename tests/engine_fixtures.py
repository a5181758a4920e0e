"""Shared engine test helpers: tiny model folders (built once per session) and transformers references.

Use the ``tiny_model`` fixture (registered in conftest.py): ``tiny_model("mixtral", layout="fused")`` returns the
folder of a tiny random checkpoint built with transformers' own classes (seed 0, fp32, byte-level tokenizer).
``hf_model``, ``hf_logits`` and ``hf_greedy`` run transformers' own model on the same folder — the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: conftest loads this module for every test session
    import torch

import pytest

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ALL_FAMILIES = DENSE_FAMILIES + MOE_FAMILIES


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: ``tiny_model(family, layout="per_expert", dtype=torch.float32, seed=0, max_shard_size=None,
    **config_overrides) -> Path``; each distinct request is built once per test session."""
    from specplan.engine.build.models import build_tiny

    _quiet_transformers()
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[tuple, Path] = {}

    def make(family: str, layout: str = "per_expert", dtype: "torch.dtype | None" = None, seed: int = 0,
             max_shard_size=None, **overrides) -> Path:
        import torch

        dtype = dtype or torch.float32
        key = (family, layout, str(dtype), seed, max_shard_size, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in built:
            folder = root / f"{family}-{layout}-{len(built)}"
            built[key] = build_tiny(family, folder, seed=seed, dtype=dtype, layout=layout,
                                    max_shard_size=max_shard_size, **overrides)
        return built[key]

    return make


def hf_model(folder: Path, dtype: "torch.dtype | None" = None):
    """transformers' own model on the folder (eager attention and experts: they also run in float64)."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    dtype = dtype or torch.float32
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager",
                                                experts_implementation="eager").eval()


def hf_logits(folder: Path, tokens: "torch.Tensor", dtype: "torch.dtype | None" = None, model=None) -> "torch.Tensor":
    import torch

    model = model or hf_model(folder, dtype)
    with torch.no_grad():
        return model(tokens).logits


def hf_greedy(folder: Path, prompt: list[int], new_tokens: int, dtype: "torch.dtype | None" = None,
              model=None) -> list[int]:
    """Plain transformers greedy decoding of one prompt (no EOS stop): the new token ids."""
    import torch

    from transformers import GenerationConfig

    model = model or hf_model(folder, dtype)
    ids = torch.tensor([prompt])
    model.generation_config.eos_token_id = None  # never stop early: the engine's generate does not either
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert out.shape[1] == len(prompt) + new_tokens
    return out[0, len(prompt):].tolist()
