"""Run a plan file on its model and compare: the work of ``specplan run`` (and of the demo's runs).

``run_plan_file`` loads the plan, reads the prompts, opens the weights, runs the engine, compares with the planner
(``compare.comparison``) and writes result.json, outputs.jsonl, timeline.json, trace.json, gantt.png and, for a
speculative plan, calibration.json (the measured acceptance, for ``specplan search --calibration``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from specplan.contracts.calibration import AcceptanceRecord, Calibration
from specplan.contracts.plan import Plan, Sampling
from specplan.planner.dtypes import kv_dtype_for
from specplan.errors import SpecplanError
from specplan.gguf import refuse_gguf_weights
from specplan.jsonio import load, read_text, write_atomic, write_json


@dataclass(frozen=True)
class RunReport:
    plan: Plan
    report: dict[str, Any]  # the result.json body
    written: list[Path]
    reused: bool = False  # a finished run of the same plan, prompts and length found in the folder, not run again


#: the files of a finished run, result.json (written last: its presence marks the run finished) first.
RUN_FILES = ("result.json", "outputs.jsonl", "timeline.json", "trace.json", "gantt.png")


def plan_id(plan) -> str:
    """A plan's identity: a hash of everything that decides its run (the model, draft, profile, budgets, workload,
    policy and placement; not when or by which command line it was written, nor the search's figures)."""
    body = plan.model_dump(mode="json", exclude={"created_utc", "command", "prediction", "search"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def at_dtype(plan: Plan, dtype: str) -> Plan:
    """The plan with its weights and KV cache in ``dtype``, and its prediction recomputed for them."""
    from specplan.planner.predict import predict

    policy = plan.policy.model_copy(update={"weight_dtype": dtype, "kv_dtype": kv_dtype_for(dtype)})
    plan = plan.model_copy(update={"policy": policy, "prediction": None})
    return plan.model_copy(update={"prediction": predict(plan)})


def at_synthetic_acceptance(plan: Plan, acceptance: float) -> Plan:
    """The plan a synthetic-acceptance run is compared with: its acceptance the synthetic one (each proposal
    accepted with that probability is exactly the one-parameter model), its prediction recomputed for it."""
    from specplan.planner.predict import predict

    if not plan.policy.speculative:
        raise SpecplanError("--synthetic-acceptance needs a speculative plan (one with a draft); this plan has none")
    policy = plan.policy.model_copy(update={"acceptance": acceptance, "acceptance_curve": None})
    plan = plan.model_copy(update={"policy": policy, "prediction": None})
    return plan.model_copy(update={"prediction": predict(plan)})


def run_id(plan: Plan, texts: list[str], new_tokens: int, stop_at_eos: bool, raw: bool = False,
           synthetic_acceptance: float | None = None) -> str:
    """A run's identity: its plan (``plan_id``), its prompts in order, the tokens asked for, the stop rule,
    whether the prompts went in raw (``--raw``) or in the tokenizer's chat template, and a synthetic acceptance."""
    body = [plan_id(plan), texts, new_tokens, stop_at_eos, "raw" if raw else "chat template"]
    if synthetic_acceptance is not None:
        body.append(synthetic_acceptance)
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]


#: ``report["stop"]``: how a run's sequences end
STOP_AT_EOS = "at EOS or max_new_tokens"
FIXED_LENGTH = "fixed length: max_new_tokens, EOS ignored (benchmark workload)"
#: what the demo and validate print of their runs: they compare with the prediction, which assumes fixed length
FIXED_LENGTH_WORKLOAD = "fixed-length workload (benchmark): EOS ignored"


def prompt_format(tok, raw: bool = False) -> str:
    """How ``encode_prompts`` encodes prompts with this tokenizer: "chat template" or "raw"."""
    return "raw" if raw or getattr(tok, "chat_template", None) is None else "chat template"


def encode_prompts(tok, texts: list[str], raw: bool = False) -> list[list[int]]:
    """The token ids of each prompt as a run feeds it: one user message in the tokenizer's chat template with the
    assistant's generation prompt after it (an Instruct model then answers), or, with ``raw`` or a tokenizer
    without a template, the text as it is. Every run, the demo's and validate's plans and prompts use this."""
    if prompt_format(tok, raw) == "raw":
        return [_token_list(tok(t)["input_ids"]) for t in texts]
    return [_token_list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                tokenize=True)) for t in texts]


def _token_list(ids) -> list[int]:
    """A plain list of ints from what a tokenizer returns (a list, a BatchEncoding / dict, a tensor, one row)."""
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids)
    if len(ids) == 1 and isinstance(ids[0], (list, tuple)):
        ids = list(ids[0])
    return [int(i) for i in ids]


def finished_run(plan: Plan, out: Path, rid: str) -> RunReport | None:
    """The run already in ``out`` if it finished (all its files there) with the identity ``rid``, else None."""
    if not all((out / name).is_file() for name in RUN_FILES):
        return None
    try:
        report = json.loads((out / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("run_id") != rid:
        return None
    calibration = [out / "calibration.json"] if (out / "calibration.json").is_file() else []
    return RunReport(plan, report, calibration + [out / name for name in RUN_FILES], reused=True)




def existing_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecplanError(f"{p}: no such {what} file" + (" (it is a folder)" if p.is_dir() else ""))
    return p


def bundled_prompts() -> Path:
    return Path(str(resources.files("specplan.profiles").joinpath("prompts/default.txt")))


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or JSONL (a "prompt" key per line)."""
    p = existing_file(path, "prompts") if path else bundled_prompts()
    lines = [line.strip() for line in read_text(p, "a UTF-8 text or JSONL file of prompts").splitlines()]
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
        except (ValueError, RecursionError) as e:  # an integer of more than 4300 digits, or nesting too deep
            why = str(e).splitlines()[0][:80] if str(e) else "nested too deeply"
            raise SpecplanError(f"{p}: line {n} is not JSON ({why}); JSONL prompts need one object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise SpecplanError(f"{p}: line {n} has no \"prompt\" text; JSONL prompts need a \"prompt\" key")
        out.append(obj["prompt"])
    return out


def open_model(plan: Plan, model_dir: str | None):
    """The checkpoint to run: ``model_dir`` (checked against the plan), or the folder the plan was made for."""
    from specplan.engine.execute.runtime import check_same_architecture
    from specplan.engine.model.checkpoint import open_checkpoint

    if model_dir is None:
        if plan.model.path is not None:
            refuse_gguf_weights(plan.model.path, "the plan's model")
        if plan.model.path is None:
            raise SpecplanError(f"the plan is for the catalog model '{plan.model.name}', whose weights are not here; "
                                f"pass --model DIR with the weights of {plan.model.name}")
        if not Path(plan.model.path).is_dir():
            raise SpecplanError(f"the plan's model folder {plan.model.path} does not exist here; pass --model DIR "
                                f"with the weights of {plan.model.name}")
        model_dir = plan.model.path
    refuse_gguf_weights(model_dir, "--model")
    ckpt = open_checkpoint(model_dir)
    check_same_architecture(plan.model.spec, ckpt.spec, f"--model {model_dir}")
    return ckpt


def run_plan_file(plan_file: str | Path, *, model_dir: str | None = None, draft_dir: str | None = None,
                  prompts_file: str | Path | None = None, max_new_tokens: int | None = None,
                  num_prompts: int | None = None, stop_at_eos: bool = False, raw: bool = False,
                  out_dir: str | Path | None = None, resume: bool = False, sampling: Sampling | None = None,
                  dtype: str | None = None, synthetic_acceptance: float | None = None) -> RunReport:
    """Run PLAN.json on its model (the plan's workload unless ``max_new_tokens`` / ``num_prompts`` say otherwise,
    prompts repeated to ``num_prompts``), compare with the prediction and write the result files. ``stop_at_eos``
    False: the fixed-length (benchmark) workload the prediction assumes; ``raw``: prompts without the chat template
    (``encode_prompts``). ``resume``: a finished run of the same plan, prompts, length, stop rule and prompt format
    in ``out_dir`` is returned as it is (``RunReport.reused``). ``synthetic_acceptance`` A: a benchmark mode, not
    lossless: each proposal accepted with probability A (``at_synthetic_acceptance``); every output says so and no
    calibration.json is written."""
    from specplan.engine.execute.runtime import refuse_speculative

    plan = load(Plan, existing_file(plan_file, "plan"))
    if sampling is not None and sampling != plan.workload.sampling:  # the run decodes as asked; the plan records it
        plan = plan.model_copy(update={"workload": plan.workload.model_copy(update={"sampling": sampling})})
    if dtype is not None and dtype != plan.policy.weight_dtype:  # re-costed at that dtype: the prediction follows
        plan = at_dtype(plan, dtype)
    if synthetic_acceptance is not None:
        if not 0.0 < synthetic_acceptance <= 1.0:
            raise SpecplanError(f"--synthetic-acceptance must lie in (0, 1], got {synthetic_acceptance:g}")
        plan = at_synthetic_acceptance(plan, synthetic_acceptance)
    refuse_speculative(plan)
    texts, distinct, new_tokens = workload_of(plan, prompts_file, num_prompts, max_new_tokens)
    stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
    out = Path(out_dir) if out_dir else Path("results") / f"{Path(plan_file).stem}-{stamp}"
    if out.exists() and not out.is_dir():
        raise SpecplanError(f"{out}: exists and is not a folder; pass -o with a folder")
    rid = run_id(plan, texts, new_tokens, stop_at_eos, raw, synthetic_acceptance)
    done = finished_run(plan, out, rid) if resume else None
    if done is not None:
        return done
    ckpt = open_model(plan, model_dir)
    return _run(plan, ckpt, texts, distinct, new_tokens, stop_at_eos, out, draft_dir, raw, synthetic_acceptance)


def workload_of(plan: Plan, prompts_file: str | Path | None, num_prompts: int | None,
                max_new_tokens: int | None) -> tuple[list[str], int, int]:
    """The prompts a run feeds (the file's, repeated to ``num_prompts``, else the plan's count), how many of them
    are distinct, and the tokens asked for per sequence (``max_new_tokens``, else the plan's)."""
    n_prompts = num_prompts or plan.workload.num_prompts
    texts = read_prompts(prompts_file)
    return [texts[i % len(texts)] for i in range(n_prompts)], min(len(texts), n_prompts), \
        max_new_tokens or plan.workload.gen_len


def find_finished(plan_file: str | Path, prompts_file: str | Path | None, num_prompts: int | None,
                  max_new_tokens: int | None, out: Path, synthetic_acceptance: float | None = None) -> dict | None:
    """The result.json body of the fixed-length run ``specplan run PLAN --fixed-length`` with these options
    finished in ``out`` (same plan, prompts, length and synthetic acceptance), else None."""
    plan = load(Plan, existing_file(plan_file, "plan"))
    if synthetic_acceptance is not None:
        plan = at_synthetic_acceptance(plan, synthetic_acceptance)
    texts, _, new_tokens = workload_of(plan, prompts_file, num_prompts, max_new_tokens)
    done = finished_run(plan, out, run_id(plan, texts, new_tokens, False, False, synthetic_acceptance))
    return None if done is None else done.report


def _run(plan: Plan, ckpt, texts: list[str], distinct: int, new_tokens: int, stop_at_eos: bool, out: Path,
         draft_dir: str | None, raw: bool = False, synthetic_acceptance: float | None = None) -> RunReport:
    from tqdm import tqdm

    from specplan.engine.execute.runtime import run_plan
    from specplan.validation.compare import comparison
    from specplan.validation.drift import drift_report

    tok = ckpt.tokenizer()
    prompts = encode_prompts(tok, texts, raw)
    if any(not p for p in prompts):
        raise SpecplanError("a prompt encodes to no tokens; remove empty prompts from the file")
    eos = eos_ids(ckpt, tok)
    with tqdm(total=0, unit="B", unit_scale=True, desc="converting to the offload layout", leave=False,
              disable=None) as conv, \
            tqdm(total=len(prompts) * new_tokens, unit="tok", desc="generating", disable=None) as bar:
        def on_convert(n: int) -> None:
            conv.total = None
            conv.update(n)

        result = run_plan(plan, ckpt, prompts, new_tokens, stop_at_eos=stop_at_eos, eos_ids=eos,
                          on_tokens=bar.update, on_convert=on_convert, draft_dir=draft_dir,
                          synthetic_acceptance=synthetic_acceptance)
    report = comparison(plan, result)
    report["prompts_distinct"] = distinct
    report["run_id"] = run_id(plan, texts, new_tokens, stop_at_eos, raw, synthetic_acceptance)
    report["sampling"] = plan.workload.sampling.model_dump()
    report["stop"] = STOP_AT_EOS if stop_at_eos else FIXED_LENGTH
    report["prompt_format"] = prompt_format(tok, raw)
    stopped = [stopped_at_eos(s, eos, stop_at_eos) for s in result.seqs]
    report["workload"]["generated_tokens_mean"] = report["measured"]["generated_tokens"] / len(result.seqs)
    report["stopped_at_eos"] = sum(stopped)
    report["drift"] = drift_report(plan, result, report)
    return RunReport(plan, report, write_run(out, plan, result, report, texts, tok, stopped))


def stopped_at_eos(seq, eos: list[int], stop_at_eos: bool) -> bool:
    """Whether a sequence ended at an end-of-sequence token (only a run that stops at EOS does)."""
    return stop_at_eos and bool(seq.generated) and seq.generated[-1] in eos


def eos_ids(ckpt, tok) -> list[int]:
    """The end-of-sequence ids of the checkpoint's config and of its tokenizer."""
    eos = ckpt.spec.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def write_run(out: Path, plan: Plan, result, report: dict, texts: list[str], tok,
              stopped: list[bool] | None = None) -> list[Path]:
    """The result files of one run; returns their paths (calibration.json first when there is one). A line of
    outputs.jsonl: the prompt, the prompt as sent (its token ids decoded: the chat template's text, special tokens
    included), the answer without special tokens, its token ids and whether it stopped at EOS."""
    from specplan.trace import write_chrome_trace, write_gantt_png, write_timeline

    stopped = stopped or [False] * len(result.seqs)
    mode = report.get("benchmark_mode")
    marked = {"benchmark_mode": mode["note"]} if mode else {}  # a synthetic-acceptance answer is not the target's
    rows = [json.dumps({"index": s.index, "prompt": texts[s.index], "prompt_sent": tok.decode(s.prompt),
                        "prompt_tokens": len(s.prompt),
                        "generated_text": tok.decode(s.generated, skip_special_tokens=True),
                        "token_ids": s.generated, "generated_tokens": len(s.generated),
                        "stopped_at_eos": stop, **marked}, ensure_ascii=False) for s, stop in zip(result.seqs, stopped)]
    pol = plan.policy
    title = (f"measured {plan.model.name}: {len(result.seqs)} prompts x {tokens_label(report['workload'])}, "
             f"{pol.num_batches} x {pol.decode_batch} sequences, prefetch depth {pol.prefetch_depth}"
             + (f" [synthetic acceptance {mode['synthetic_acceptance']:g}: benchmark mode, not lossless]"
                if mode else ""))
    written = []
    acc = report.get("acceptance")
    if mode is not None:  # never a calibration from a synthetic acceptance, nor an earlier one left beside it
        (out / "calibration.json").unlink(missing_ok=True)
    elif acc is not None and acc["measured"] is not None:
        written.append(write_json(out / "calibration.json", calibration_of(plan, acc, out)))
    (out / "result.json").unlink(missing_ok=True)  # a run killed while writing is not taken for a finished one
    files = [write_atomic(out / "outputs.jsonl", "\n".join(rows) + "\n"),
             write_timeline(result.timeline, out / "timeline.json"),
             write_chrome_trace(result.timeline, out / "trace.json"),
             write_gantt_png(result.timeline, out / "gantt.png", title=title)]
    return written + [write_json(out / "result.json", report), *files]  # result.json last: the run is finished


def tokens_label(wl: dict) -> str:
    """ "N tokens", or, when sequences stopped early, "M.m tokens mean (at most N)"."""
    mean = wl.get("generated_tokens_mean", wl["gen_len"])
    return f"{wl['gen_len']} tokens" if mean >= wl["gen_len"] else f"{mean:.1f} tokens mean (at most {wl['gen_len']})"


def calibration_of(plan: Plan, acc: dict, out: Path) -> Calibration:
    """The measured acceptance (``acceptance_report``) as a calibration file that ``specplan search
    --calibration`` reads."""
    proposed, accepted = acc["proposed_tokens"], acc["accepted_tokens"]
    rec = AcceptanceRecord(draft=plan.draft.label, target=plan.model.name, per_token_acceptance_mle=acc["measured"],
                           accepted_fraction=accepted / proposed if proposed else None,
                           proposed_tokens=proposed or None, accepted_tokens=accepted if proposed else None,
                           acceptance_curve=acc.get("measured_curve"),
                           sequence_curves=acc.get("measured_sequence_curves"),
                           curve_sequence_rounds=acc["sequence_rounds"] if acc.get("measured_curve") else None,
                           source=f"specplan run {out}: {acc['sequence_rounds']} sequence-rounds of "
                                  f"{acc['draft_len']} proposals, "
                                  + ("greedy verification" if plan.workload.sampling.greedy else
                                     f"rejection sampling at {plan.workload.sampling.label()}"),
                           sampling=plan.workload.sampling)
    return Calibration(created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), acceptance=[rec])
