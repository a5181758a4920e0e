"""KV-cache bytes, KV capacity, activation bytes and causal attention positions: one function each, called by the
planner and the engine alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from specplan.contracts.tensors import dtype_bytes, nbytes

if TYPE_CHECKING:
    from specplan.contracts.model import ModelSpec


def kv_bytes(spec: ModelSpec, dtype: str, seqs: int, positions: int, layers: int | None = None) -> int:
    """Bytes of K and V at ``dtype`` for ``seqs`` sequences of ``positions`` positions, over ``layers`` layers
    (default: all of the model's)."""
    n = spec.num_layers if layers is None else layers
    return nbytes(2 * n * seqs * positions * spec.kv_dim, dtype)


def kv_capacity(prompt_len: int, new_tokens: int, draft_len: int) -> int:
    """KV positions one sequence needs (tokens): its prompt, its new tokens, and the ``draft_len`` positions a
    verification pass writes past the final token."""
    return prompt_len + new_tokens + draft_len


def mean_decode_context(prompt_len: int, gen_len: int) -> int:
    """KV positions (tokens) averaged over the decode rounds of one sequence: attention cost is linear in it."""
    return prompt_len + gen_len // 2


def last_decode_context(prompt_len: int, gen_len: int) -> int:
    """KV positions (tokens) cached before the last decode pass of one sequence: where working memory peaks."""
    return prompt_len + gen_len


def causal_positions(tokens, context):
    """Key positions the ``tokens`` new tokens of one sequence attend to over ``context`` cached ones (causal):
    T*c + T(T+1)/2. Works on ints and on integer tensors alike."""
    return tokens * context + tokens * (tokens + 1) // 2


def activation_bytes(spec: ModelSpec, dtype: str, seqs: int, tokens: int, context: int, logit_rows: int,
                     draft: ModelSpec | None = None) -> float:
    """Working memory (bytes) of one forward pass of ``seqs`` sequences of ``tokens`` new tokens over ``context``
    cached positions: hidden states, q/k/v and FFN intermediates at ``dtype``, attention scores and ``logit_rows``
    rows of logits in float32; with ``draft``, also the draft model's one-token working set per sequence."""
    act = dtype_bytes(dtype)
    rows = seqs * tokens
    ffn = max(spec.intermediate_size if spec.dense_layers else 0,
              spec.experts_per_token * spec.moe_intermediate_size + spec.shared_expert_intermediate_size)
    per_row = (4 * spec.hidden_size + spec.q_dim + 2 * spec.kv_dim + 2 * ffn) * act
    scores = rows * spec.num_heads * (context + tokens) * 4
    total = rows * per_row + scores + logit_rows * spec.vocab_size * 4
    if draft is not None:
        total += seqs * ((4 * draft.hidden_size + 2 * max(draft.intermediate_size, draft.moe_intermediate_size)) * act
                         + draft.vocab_size * 4)
    return total
