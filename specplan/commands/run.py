"""``specplan run``: execute a plan on the bundled engine and compare what happened with what was predicted."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import click

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
@click.option("--stop-at-eos", is_flag=True,
              help="End a sequence at its first end-of-sequence token [default: always generate N tokens, as the "
                   "plan's workload assumes].")
@click.option("-o", "--output", "out_dir", metavar="DIR", default=None,
              help="Results folder [default: results/<plan name>-<UTC time>/].")
def command(plan_file: str, model_dir: str | None, draft_dir: str | None, prompts_file: str | None, max_new_tokens: str | None,
            num_prompts: str | None, stop_at_eos: bool, out_dir: str | None) -> None:
    """Run PLAN.json on its model: weights on device / host / disk as placed, disk tensors read with O_DIRECT and
    prefetched, greedy decoding with the plan's batches; speculative with the plan's draft model (greedy
    verification: the output is the target's own), two interleaved batches drafting in turn.

    Prints predicted vs measured throughput (decode-only and end-to-end), time to first token, busy time per
    resource and the signed error (predicted - measured) / measured. Writes result.json, outputs.jsonl (prompts and
    generated text), timeline.json, trace.json (ui.perfetto.dev) and gantt.png to the results folder, and for a
    speculative plan calibration.json (the measured acceptance, for specplan search --calibration).
    """
    from specplan.contracts.plan import Plan
    from specplan.jsonio import load

    from specplan.engine.execute.runtime import refuse_speculative

    plan = load(Plan, _existing_file(plan_file, "plan"))
    refuse_speculative(plan)
    new_tokens = _positive(max_new_tokens, "--max-new-tokens") or plan.workload.gen_len
    n_prompts = _positive(num_prompts, "--num-prompts") or plan.workload.num_prompts
    texts = read_prompts(prompts_file)
    out = Path(out_dir) if out_dir else Path("results") / f"{Path(plan_file).stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if out.exists() and not out.is_dir():
        raise SpecplanError(f"{out}: exists and is not a folder; pass -o with a folder")
    ckpt = open_model(plan, model_dir)
    _run(plan, ckpt, [texts[i % len(texts)] for i in range(n_prompts)], min(len(texts), n_prompts), new_tokens,
         stop_at_eos, out, draft_dir)


# ---- inputs ------------------------------------------------------------------------------------------------------


def _existing_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecplanError(f"{p}: no such {what} file" + (" (it is a folder)" if p.is_dir() else ""))
    return p


def _positive(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise SpecplanError(f"{flag} must be a positive whole number, got '{value}'")
    return n


def bundled_prompts() -> Path:
    return Path(str(resources.files("specplan.profiles").joinpath("prompts/default.txt")))


def read_prompts(path: str | None) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or JSONL (a "prompt" key per line)."""
    p = _existing_file(path, "prompts") if path else bundled_prompts()
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise SpecplanError(f"{p}: cannot read the prompts ({e}); pass a UTF-8 text or JSONL file") from None
    lines = [line for line in lines if line]
    if not lines:
        raise SpecplanError(f"{p}: no prompts in the file; write one prompt per line")
    if p.suffix != ".jsonl" and not lines[0].startswith("{"):
        return lines
    out = []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecplanError(f"{p}: line {n} is not JSON ({e.msg}); JSONL prompts need one object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise SpecplanError(f"{p}: line {n} has no \"prompt\" text; JSONL prompts need a \"prompt\" key")
        out.append(obj["prompt"])
    return out


def open_model(plan, model_dir: str | None):
    """The checkpoint to run: --model DIR (checked against the plan), or the folder the plan was made for."""
    from specplan.engine.model.checkpoint import open_checkpoint
    from specplan.engine.execute.runtime import check_same_architecture

    if model_dir is None:
        if plan.model.path is None:
            raise SpecplanError(f"the plan is for the catalog model '{plan.model.name}', whose weights are not here; "
                                f"pass --model DIR with the weights of {plan.model.name}")
        if not Path(plan.model.path).is_dir():
            raise SpecplanError(f"the plan's model folder {plan.model.path} does not exist here; pass --model DIR "
                                f"with the weights of {plan.model.name}")
        model_dir = plan.model.path
    ckpt = open_checkpoint(model_dir)
    check_same_architecture(plan.model.spec, ckpt.spec, f"--model {model_dir}")
    return ckpt


# ---- the run -----------------------------------------------------------------------------------------------------


def _run(plan, ckpt, texts: list[str], distinct: int, new_tokens: int, stop_at_eos: bool, out: Path,
         draft_dir: str | None = None) -> None:
    from tqdm import tqdm

    from specplan.engine.execute.results import comparison
    from specplan.engine.execute.runtime import run_plan

    tok = ckpt.tokenizer()
    prompts = [tok(t)["input_ids"] for t in texts]
    if any(not p for p in prompts):
        raise SpecplanError("a prompt encodes to no tokens; remove empty prompts from the file")
    eos = _eos_ids(ckpt, tok)
    with tqdm(total=0, unit="B", unit_scale=True, desc="converting to the offload layout", leave=False,
              disable=None) as conv, \
            tqdm(total=len(prompts) * new_tokens, unit="tok", desc="generating", disable=None) as bar:
        def on_convert(n: int) -> None:
            conv.total = None
            conv.update(n)

        result = run_plan(plan, ckpt, prompts, new_tokens, stop_at_eos=stop_at_eos, eos_ids=eos,
                          on_tokens=bar.update, on_convert=on_convert, draft_dir=draft_dir)
    report = comparison(plan, result)
    report["prompts_distinct"] = distinct
    report["stop"] = "at EOS or max_new_tokens" if stop_at_eos else "max_new_tokens (EOS ignored)"
    written = _write(out, plan, result, report, texts, tok)
    _print(plan, report, written)


def _eos_ids(ckpt, tok) -> list[int]:
    eos = ckpt.spec.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def _write(out: Path, plan, result, report: dict, texts: list[str], tok) -> list[Path]:
    from specplan.jsonio import write_atomic, write_json
    from specplan.trace import write_chrome_trace, write_gantt_png, write_timeline

    rows = [json.dumps({"index": s.index, "prompt": texts[s.index], "prompt_tokens": len(s.prompt),
                        "generated_text": tok.decode(s.generated, skip_special_tokens=True),
                        "token_ids": s.generated}, ensure_ascii=False) for s in result.seqs]
    pol = plan.policy
    title = (f"measured {plan.model.name}: {len(result.seqs)} prompts x {report['workload']['gen_len']} tokens, "
             f"{pol.num_batches} x {pol.decode_batch} sequences, prefetch depth {pol.prefetch_depth}")
    written = []
    acc = report.get("acceptance")
    if acc is not None and acc["measured"] is not None:
        written.append(write_json(out / "calibration.json", calibration_of(plan, acc, out)))
    return written + [
        write_json(out / "result.json", report),
        write_atomic(out / "outputs.jsonl", "\n".join(rows) + "\n"),
        write_timeline(result.timeline, out / "timeline.json"),
        write_chrome_trace(result.timeline, out / "trace.json"),
        write_gantt_png(result.timeline, out / "gantt.png", title=title),
    ]


def calibration_of(plan, acc: dict, out: Path):
    """The measured acceptance as a calibration file that ``specplan search --calibration`` reads."""
    from specplan.contracts.calibration import AcceptanceRecord, Calibration

    rec = AcceptanceRecord(draft=plan.draft.label, target=plan.model.name, acceptance=acc["measured"],
                           proposed_tokens=acc["proposed_tokens"], accepted_tokens=acc["accepted_tokens"],
                           source=f"specplan run {out}: {acc['sequence_rounds']} sequence-rounds of "
                                  f"{acc['draft_len']} proposals, greedy verification")
    return Calibration(created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), acceptance=[rec])


def _print(plan, r: dict, written: list[Path]) -> None:
    from rich.table import Table

    from specplan.fmt import console, human_bytes, human_seconds

    out = console()
    wl, m, p, err = r["workload"], r["measured"], r["predicted"], r["signed_error"]
    out.print(f"[bold]ran {plan.model.name}[/bold]: {wl['num_prompts']} prompts ({r['prompts_distinct']} distinct) x "
              f"{wl['gen_len']} tokens, prompt length {wl['prompt_len_mean']:.1f} mean ({wl['prompt_len_min']}-"
              f"{wl['prompt_len_max']}; the plan assumed {wl['planned_prompt_len']}); stop: {r['stop']}; "
              f"compute {r['compute_dtype']}; disk reads "
              + ("none" if r["o_direct"] is None else "O_DIRECT" if r["o_direct"] else "buffered + fadvise(DONTNEED)"))
    t = Table(title=f"predicted ({r['prediction_source']}) vs measured")
    for col in ("", "predicted", "measured", "(pred - meas) / meas"):
        t.add_column(col, justify="left" if not col else "right")

    def row(label: str, key: str, fmt) -> None:
        pv = p[key] if p else None
        e = err.get(key)
        t.add_row(label, fmt(pv) if pv is not None else "-", fmt(m[key]), f"{e:+.1%}" if e is not None else "-")

    def rate(x: float) -> str:
        return f"{x:.2f} tok/s"

    row("decode-only throughput", "decode_tok_s", rate)
    row("end-to-end throughput", "e2e_tok_s", rate)
    row("time to first token", "ttft_s", human_seconds)
    row("prefill", "prefill_s", human_seconds)
    row("decode", "decode_s", human_seconds)
    row("total", "total_s", human_seconds)
    out.print(t)
    u = Table(title="busy time per resource (whole run)")
    for col in ("resource", "predicted", "measured", "(pred - meas) / meas", "busy in decode"):
        u.add_column(col, justify="left" if col == "resource" else "right")
    pb = p["busy_s"] if p else {}
    for res in sorted(set(pb) | set(m["busy_s"])):
        e = err.get("busy_s", {}).get(res)
        frac = m["decode_busy_fraction"].get(res)
        u.add_row(res, human_seconds(pb[res]) if res in pb else "-", human_seconds(m["busy_s"].get(res, 0.0)),
                  f"{e:+.1%}" if e is not None else "-", f"{frac:.0%}" if frac is not None else "-")
    out.print(u)
    acc = r.get("acceptance")
    if acc is not None:
        measured = "-" if acc["measured"] is None else f"{acc['measured']:.3f}"
        line = (f"draft acceptance per token: assumed {acc['assumed']:.3f}, measured {measured} over "
                f"{acc['sequence_rounds']} sequence-rounds of {acc['draft_len']} proposals; tokens per sequence and "
                f"verification: measured {acc['tokens_per_seq_round_measured'] or 0:.2f}, expected "
                f"{acc['tokens_per_seq_round_expected']:.2f} at the assumed acceptance")
        at = r.get("predicted_at_measured_acceptance")
        if at is not None:
            e = r["signed_error_at_measured_acceptance"]["decode_tok_s"]
            line += (f", {acc['tokens_per_seq_round_expected_at_measured']:.2f} at the measured one; predicted at "
                     f"the measured acceptance: {at['decode_tok_s']:.2f} tok/s decode-only ({e:+.1%})")
        out.print(line)
    caps = r["capacity_bytes"]
    out.print("peak resident bytes (allocated): " + "; ".join(
        f"{tier} {human_bytes(v)}" + (f" of {human_bytes(caps[tier])}" if caps.get(tier) else "")
        for tier, v in r["peak_bytes"].items()) + f"; process max RSS {human_bytes(r['max_rss_bytes'])}")
    for path in written:
        click.echo(f"wrote {path}")
