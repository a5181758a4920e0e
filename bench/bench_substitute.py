"""Benchmark: substitute drafts (SubSpec) against the SmolLM2 draft and no draft on the demo target; goals: a
substitute's acceptance length beats the SmolLM2 draft's, and the planner's choice among the three kinds (no
draft, model draft, substitute) is the one measured fastest.

    python bench/bench_substitute.py [--profile NAME|FILE] [--vram 1.0] [--prompts 16] [--tokens 32]
                                     [--repeat 3] [--draft-len 8] [--csv bench/results/substitute.csv]
                                     [--acceptance-only]

1. Acceptance: each draft (SmolLM2-135M, ``substitute:int8``, ``substitute:int4``, ``substitute:int4:hqq``) runs its best plan at the
   budget (so the substitute replaces the weights that plan streams), set to the same draft length ``--draft-len``
   (with ``ROOM_BYTES`` more budget for that longer KV cache), on the demo's 12 held-out calibration prompts, greedy, each in its own fresh
   process; the measured acceptance length (tokens per sequence and verification, the accepted proposals plus the
   target's own token) and the per-token acceptance go into one calibration file.
2. Throughput: one search at ``--vram`` GiB (most of the target's experts stream from disk; the int4 substitute of
   the streamed weights fits) with all four drafts and that calibration; the best plan of each kind (none, model,
   substitute) runs as ``specplan run --fixed-length`` in its own fresh process, the three interleaved, ``--repeat``
   times, on the other prompts. Prints medians and min..max of end-to-end and decode-only throughput, the
   prediction's signed error, and whether the planner's choice is the measured best; one row per run in ``--csv``.
   Exits 1 if a goal is missed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from demo_setup import demo_arguments, demo_bench

SUBSTITUTES = ("substitute:int8", "substitute:int4", "substitute:int4:hqq")
ROOM_BYTES = 256 << 20  # the acceptance runs' extra device budget for the KV cache of draft length --draft-len


def main() -> None:
    ap = demo_arguments(__doc__.splitlines()[0], "results/bench-substitute", "bench/results/substitute.csv")
    ap.add_argument("--draft-len", type=int, default=8)
    ap.add_argument("--acceptance-only", action="store_true", help="step 1 only (acceptance is not a timing)")
    args = ap.parse_args()

    import pandas as pd

    from specplan.contracts.calibration import Calibration
    from specplan.contracts.plan import Plan
    from specplan.jsonio import load, write_atomic, write_json
    from specplan.planner.asking import make_ask
    from specplan.planner.predict import predict
    from specplan.planner.search import search
    from specplan.validation.trials import Contender, run_fresh, run_trials, summarise

    out = Path(args.out)
    bench = demo_bench(out, args.profile)
    profile, prompt_len = bench.profile, bench.prompt_len
    files = {"held_out": bench.held_out, "workload": bench.workload}
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; profile {profile}")

    # 1. acceptance at one draft length, each draft in its own process
    records, acc_rows = [], []
    for draft in (str(bench.draft), *SUBSTITUTES):
        ask = make_ask(str(bench.target), args.vram, None, None, profile, (draft,), None, None, prompt_len,
                       args.tokens, bench.held_out_count, 1)
        plan = search(ask).plans[0]
        # the same placement (the same weights streamed, so the same substitute) at draft length g; the longer KV
        # cache gets room of its own: acceptance does not depend on the budget
        caps = plan.capacities.model_copy(update={"device_bytes": plan.capacities.device_bytes + ROOM_BYTES})
        plan = plan.model_copy(update={"policy": plan.policy.model_copy(update={"draft_len": args.draft_len}),
                                       "capacities": caps, "prediction": None})
        plan = plan.model_copy(update={"prediction": predict(plan)})
        folder = out / "acceptance" / plan.draft.label.replace(":", "-").replace("/", "_")
        report, _ = run_fresh(write_json(folder / "plan.json", plan), files["held_out"], bench.held_out_count,
                              folder / "run")
        acc = report["acceptance"]
        records += load(Calibration, folder / "run" / "calibration.json").acceptance
        acc_rows.append({"draft": plan.draft.label, "draft_len": args.draft_len,
                         "acceptance_length": acc["tokens_per_seq_round_measured"],
                         "per_token_acceptance_mle": acc["measured"],
                         "accepted_fraction": acc["accepted_tokens"] / acc["proposed_tokens"]})
        print(f"{plan.draft.label}: acceptance length {acc['tokens_per_seq_round_measured']:.2f} tokens per "
              f"verification at g={args.draft_len} (per-token {acc['measured']:.3f}, {acc['accepted_tokens']} of "
              f"{acc['proposed_tokens']} proposals accepted)", flush=True)
    calibration = write_json(out / "calibration.json", Calibration(
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), acceptance=records))
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(args.csv).with_name("substitute_acceptance.csv"), pd.DataFrame(acc_rows).to_csv(index=False))
    lengths = {r["draft"]: r["acceptance_length"] for r in acc_rows}
    (model_length,) = [v for k, v in lengths.items() if k not in SUBSTITUTES]
    best_sub = max((k for k in lengths if k in SUBSTITUTES), key=lengths.get)
    beats = lengths[best_sub] > model_length
    print(f"acceptance length at g={args.draft_len}: " + ", ".join(f"{k} {v:.2f}" for k, v in lengths.items())
          + f"; the best substitute ({best_sub}) {'beats' if beats else 'does not beat'} the model draft")
    if args.acceptance_only:
        sys.exit(0 if beats else 1)

    # 2. the best plan of each kind, fresh processes, interleaved
    ask = make_ask(str(bench.target), args.vram, None, None, profile, ("none", str(bench.draft), *SUBSTITUTES), None,
                   str(calibration), prompt_len, args.tokens, args.prompts, 200)
    plans = search(ask).plans
    best: dict[str, Plan] = {}
    for p in plans:
        kind = "none" if not p.policy.speculative else p.draft.kind
        best.setdefault(kind, p)
    chosen_kind = "none" if not plans[0].policy.speculative else plans[0].draft.kind
    contenders = []
    for kind, p in best.items():
        print(f"best {kind} plan: draft {p.draft.label} g={p.policy.draft_len}, {p.policy.num_batches}x"
              f"{p.policy.decode_batch}, predicted {p.prediction.e2e_tok_s:.2f} tok/s end-to-end"
              + (" (the planner's choice)" if kind == chosen_kind else ""))
        contenders.append(Contender(kind, write_json(out / kind / "plan.json", p), out / kind))
    trials = run_trials(contenders, files["workload"], args.prompts, args.repeat, resume=False)
    s = summarise(trials)
    rows = [{"contender": t.contender, "rep": t.rep, "draft": t.report["policy"].get("draft_len"),
             "measured_e2e_tok_s": t.report["measured"]["e2e_tok_s"],
             "measured_decode_tok_s": t.report["measured"]["decode_tok_s"],
             "predicted_e2e_tok_s": t.report["predicted"]["e2e_tok_s"],
             "predicted_decode_tok_s": t.report["predicted"]["decode_tok_s"],
             "others_cpu_fraction": t.others_cpu_fraction, "contended": t.contended} for t in trials]
    write_atomic(Path(args.csv), pd.DataFrame(rows).to_csv(index=False))
    for kind, e in s.items():
        m = e["e2e_tok_s"]["measured"]
        d = e["decode_tok_s"]["measured"]
        print(f"{kind}: end-to-end {m['median']:.2f} tok/s ({m['min']:.2f}..{m['max']:.2f}), predicted "
              f"{e['e2e_tok_s']['predicted']:.2f} ({e['e2e_tok_s']['signed_error']:+.1%}); decode-only "
              f"{d['median']:.2f} ({d['min']:.2f}..{d['max']:.2f}); {e['trials']} trials, {e['contended_trials']} "
              f"contended")
    fastest = max(s, key=lambda k: s[k]["e2e_tok_s"]["measured"]["median"])
    print(f"the planner chose {chosen_kind}, the measured fastest is {fastest}")
    sys.exit(0 if beats and fastest == chosen_kind else 1)


if __name__ == "__main__":
    main()
