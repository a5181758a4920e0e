"""Sampling in the engine: speculative sampling's tokens are distributed as the target's own samples (chi-square
over thousands of sequences, a close and a poor draft, several draft lengths, batched and ragged); the processed
distribution (temperature, top-k, top-p) against a direct computation; a seed repeats every sequence; greedy
settings stay token-identical to greedy decoding; the test has the power to see a wrong verification."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chi2_contingency
from runtime_fixtures import make_plan
from test_speculative import models, spec_plan  # noqa: F401  (fixtures)

from specplan.contracts.plan import Placement, Sampling
from specplan.engine.execute import sampling as sampling_module
from specplan.engine.execute.runtime import run_plan
from specplan.engine.execute.sampling import Sampler, processed
from specplan.engine.model.checkpoint import open_checkpoint

PROMPT = [5, 17, 99, 3, 250, 61, 7]
N = 3000  # sequences per condition
NEW = 4  # tokens per sequence: the first from prefill, the others from speculative rounds
SETTINGS = Sampling(temperature=1.0, top_k=12, seed=11)


def tokens(out) -> list[list[int]]:
    return [s.generated for s in sorted(out.seqs, key=lambda s: s.index)]


def generate(models, draft: str | None, g: int, sampling: Sampling, n: int = N, **policy) -> list[list[int]]:
    ckpt = open_checkpoint(models["target"])
    pol = {"decode_batch": 250, "prefill_batch": 250, **policy}
    if draft is None:
        plan = make_plan(ckpt.spec, Placement.uniform(ckpt.spec, "device"), **pol)
    else:
        plan = spec_plan(ckpt, models[draft], g, placement="device", **pol)
    out = run_plan(plan, ckpt, [PROMPT] * n, NEW, dtype=torch.float64, sampling=sampling)
    return tokens(out)


def p_value(a: list, b: list) -> float:
    """Chi-square test of homogeneity of two samples of categories (rare categories pooled)."""
    ca, cb = Counter(a), Counter(b)
    total = ca + cb
    keep = [k for k, v in total.items() if v >= 20]
    rows = [[ca[k] for k in keep] + [sum(v for k, v in ca.items() if k not in keep)],
            [cb[k] for k in keep] + [sum(v for k, v in cb.items() if k not in keep)]]
    if rows[0][-1] + rows[1][-1] == 0:
        rows = [r[:-1] for r in rows]
    return chi2_contingency(rows)[1]


def statistics(seqs: list[list[int]]) -> dict[str, list]:
    """What is compared: the token at each speculative position, and the pair of the first two."""
    out = {f"token {i}": [s[i] for s in seqs] for i in range(1, NEW)}
    out["tokens 1-2"] = [(s[1], s[2]) for s in seqs]
    return out


@pytest.fixture(scope="module")
def reference(models):
    """Plain sampling from the target alone."""
    return statistics(generate(models, None, 0, SETTINGS))


@pytest.mark.slow
@pytest.mark.parametrize("draft,g", [("close", 1), ("close", 3), ("random", 2), ("random", 4)])
def test_speculative_sampling_is_distributed_as_the_target(models, reference, draft, g):
    got = statistics(generate(models, draft, g, SETTINGS.model_copy(update={"seed": 12 + g})))
    # eight tests per pair of conditions ran here: 1e-3 each keeps a false alarm below 1% in all
    for name, sample in got.items():
        p = p_value(sample, reference[name])
        assert p > 1e-3, f"{draft} draft, g={g}: {name} differs from the target's own sampling (p = {p:.2g})"


@pytest.mark.slow
def test_the_test_sees_a_wrong_verification(models, reference, monkeypatch):
    """Accepting every proposal (no rejection step) samples the draft, not the target: the test must say so."""
    monkeypatch.setattr(sampling_module.Sampler, "accept",
                        lambda self, proposals, q, p, seq: (len(proposals), [*proposals, self.draw(p[-1], seq)]))
    got = statistics(generate(models, "random", 3, SETTINGS.model_copy(update={"seed": 99})))
    assert min(p_value(got[k], reference[k]) for k in got) < 1e-6


@pytest.mark.slow
def test_top_p_and_two_interleaved_batches(models):
    s = Sampling(temperature=0.7, top_p=0.8, seed=5)
    plain = statistics(generate(models, None, 0, s, n=2000))
    spec = statistics(generate(models, "close", 3, s.model_copy(update={"seed": 6}), n=2000, num_batches=2,
                               decode_batch=125))
    for name in plain:
        assert p_value(spec[name], plain[name]) > 1e-3, name


def test_a_seed_repeats_every_sequence_and_another_changes_them(models):
    a = generate(models, "close", 3, SETTINGS, n=40)
    assert a == generate(models, "close", 3, SETTINGS, n=40)
    assert a != generate(models, "close", 3, SETTINGS.model_copy(update={"seed": 1}), n=40)
    # a sequence's tokens do not depend on the batch it runs in
    assert a == generate(models, "close", 3, SETTINGS, n=40, decode_batch=7, prefill_batch=3)


def test_greedy_settings_are_greedy_decoding(models):
    greedy = generate(models, None, 0, Sampling(), n=5)
    assert generate(models, "random", 3, Sampling(seed=4, top_k=3), n=5) == greedy  # temperature 0: greedy
    assert all(s == greedy[0] for s in greedy)


def test_processed_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    full = torch.softmax(logits / 0.5, -1)
    assert torch.allclose(processed(logits, Sampling(temperature=0.5)), full)
    top2 = processed(logits, Sampling(temperature=0.5, top_k=2))
    assert torch.allclose(top2[0, :2], full[0, :2] / full[0, :2].sum()) and top2[0, 2:].sum() == 0
    # top-p 0.9: the smallest prefix of the sorted tokens whose mass reaches 0.9
    cum = full[0].cumsum(0)
    k = int((cum < 0.9).sum()) + 1
    nucleus = processed(logits, Sampling(temperature=0.5, top_p=0.9))
    assert (nucleus[0, :k] > 0).all() and nucleus[0, k:].sum() == 0
    assert torch.allclose(nucleus[0, :k], full[0, :k] / full[0, :k].sum())


def test_rejection_step_commits_the_residual():
    """A proposal the target gives no mass is always rejected, and the correction comes from max(0, p - q)."""
    sampler = Sampler(Sampling(temperature=1.0, seed=3))
    q = torch.tensor([[0.0, 1.0, 0.0]])
    p = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    seen = Counter()
    for seq in range(400):
        n, commit = sampler.accept([1], q, p, seq)
        assert n == 0 and commit[0] in (0, 2)
        seen[commit[0]] += 1
    assert 150 < seen[0] < 250
    n, commit = sampler.accept([0], torch.tensor([[0.6, 0.2, 0.2]]), p, 0)  # p(0) / q(0) < 1: accepted at times
    assert n in (0, 1)
