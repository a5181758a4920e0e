"""``specplan run``: execute a plan on the bundled engine and compare what happened with what was predicted."""

from __future__ import annotations

import click

from specplan.commands._params import sampling_of, sampling_options
from specplan.contracts.plan import MAX_PROMPTS, MAX_TOKENS
from specplan.planner.dtypes import ENGINE_DTYPES
from specplan.errors import SpecplanError


@click.command("run")
@click.argument("plan_file", metavar="PLAN.json")
@click.option("--model", "model_dir", metavar="DIR", default=None,
              help="HF model folder with the weights [default: the folder the plan was made for]; its config must "
                   "match the plan's model.")
@click.option("--draft-model", "draft_dir", metavar="DIR", default=None,
              help="HF folder with the draft model's weights [default: the folder the plan's draft was searched "
                   "with]; its config must match the plan's draft.")
@click.option("--prompts", "prompts_file", metavar="FILE", default=None,
              help="Prompts: one per line, or JSONL with a \"prompt\" key [default: the bundled English prompts].")
@click.option("--max-new-tokens", metavar="N", default=None,
              help="Tokens generated per prompt [default: the plan's workload.gen_len].")
@click.option("--num-prompts", metavar="N", default=None,
              help="Prompts to run, the file's prompts repeated if it has fewer [default: the plan's "
                   "workload.num_prompts].")
@click.option("--fixed-length", is_flag=True,
              help="Always generate N tokens per prompt, EOS ignored: the benchmark workload the plan's prediction "
                   "assumes [default: a sequence ends at its first end-of-sequence token, or after N tokens].")
@click.option("--stop-at-eos", is_flag=True, hidden=True,
              help="Deprecated: stopping at EOS is the default now.")
@click.option("--raw", is_flag=True,
              help="Feed each prompt's text as it is [default: as one user message in the tokenizer's chat "
                   "template, followed by the assistant's turn, when the tokenizer has a template].")
@sampling_options(from_plan=True)
@click.option("--dtype", type=click.Choice(ENGINE_DTYPES), default=None,
              help="Run the weights (and the KV cache) in this dtype instead of the plan's; the prediction and the "
                   "memory check are recomputed for it.")
@click.option("--synthetic-acceptance", "synthetic", metavar="A", type=float, default=None,
              help="Benchmark mode, NOT lossless (speculative plans): accept each draft proposal with probability A "
                   "(0 < A <= 1) from a seeded generator instead of checking it against the target; the prediction "
                   "is recomputed at A, every output is marked, no calibration.json is written.")
@click.option("-o", "--output", "out_dir", metavar="DIR", default=None,
              help="Results folder [default: results/<plan name>-<UTC time>/].")
def command(plan_file: str, model_dir: str | None, draft_dir: str | None, prompts_file: str | None, max_new_tokens: str | None,
            num_prompts: str | None, fixed_length: bool, stop_at_eos: bool, raw: bool, temperature: float | None,
            top_p: float | None, top_k: int | None, seed: int | None, dtype: str | None, synthetic: float | None,
            out_dir: str | None) -> None:
    """Run PLAN.json on its model: weights on device / host / disk as placed, disk tensors read with O_DIRECT and
    prefetched, decoding with the plan's batches, greedy or sampled as the plan's workload says (or --temperature, --top-p,
    --top-k, --seed); speculative with the plan's draft model (greedy or rejection-sampling verification: the output
    is the target's own, or distributed as its samples), two interleaved batches drafting in turn.

    Prompts go in the tokenizer's chat template (one user message) unless --raw; a sequence ends at EOS unless
    --fixed-length (the benchmark workload the prediction assumes).

    Prints predicted vs measured throughput (decode-only and end-to-end, counting the tokens really generated),
    time to first token, busy time per resource and the signed error (predicted - measured) / measured. Writes
    result.json, outputs.jsonl (prompts, the prompts as sent, the answers and whether each stopped at EOS),
    timeline.json, trace.json (ui.perfetto.dev) and gantt.png to the results folder, and for a speculative plan
    calibration.json (the measured acceptance, for specplan search --calibration).
    """
    from specplan.contracts.plan import Plan
    from specplan.jsonio import load
    from specplan.validation.runs import existing_file, run_plan_file
    from specplan.validation.show import show_run, show_written

    if fixed_length and stop_at_eos:
        raise SpecplanError("--fixed-length ignores EOS and --stop-at-eos stops at it; pass one (stopping at EOS is "
                            "the default)")
    given = (temperature, top_p, top_k, seed)
    sampling = None if all(v is None for v in given) else \
        sampling_of(load(Plan, existing_file(plan_file, "plan")).workload.sampling, *given)
    run = run_plan_file(plan_file, model_dir=model_dir, sampling=sampling, draft_dir=draft_dir, prompts_file=prompts_file,
                        max_new_tokens=_positive(max_new_tokens, "--max-new-tokens", MAX_TOKENS),
                        num_prompts=_positive(num_prompts, "--num-prompts", MAX_PROMPTS),
                        stop_at_eos=not fixed_length, raw=raw, out_dir=out_dir, dtype=dtype,
                        synthetic_acceptance=synthetic)
    show_run(run.plan, run.report)
    show_written(run.written)


def _positive(value: str | None, flag: str, most: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= most:
        shown = repr(value) if len(value) <= 40 else repr(value[:37] + "...")
        raise SpecplanError(f"{flag} must be a positive whole number (at most {most}), got {shown}")
    return n
