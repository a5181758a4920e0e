"""Benchmark: the demo's best plan with the dtype chosen from the profile (bf16 on a CPU with AMX) against the same
search forced to float32; goal: >= 1.7x end-to-end on the disk-bound demo (bytes halve), predictions within 10%.

    python bench/bench_dtype.py [--profile NAME|FILE] [--vram 1.0] [--prompts 16] [--tokens 32] [--repeat 3]
                                [--acceptance A] [--csv bench/results/dtype.csv]

Both plans come from one search each on the same ask (the demo target, SmolLM2 upcycled into a Mixtral-architecture
MoE, under a resident budget of ``--vram`` GiB, most experts on disk; with SmolLM2 as a draft when ``--acceptance``
or the demo's calibration gives its acceptance, else without a draft). Each plan runs as ``specplan run
--fixed-length`` in its own fresh process, the two interleaved (the order rotated each repetition), ``--repeat``
times after one warm-up each (which also writes the plan's offload file in its dtype), same prompts and memory
budget. A run during which other processes took more than 15% of the CPUs is void and repeated. Prints per plan the
median and spread (min..max) of the measured end-to-end and decode-only throughput, the prediction's signed error,
and the ratio of the medians measured in this one benchmark; writes one row per run to ``--csv``; exits 1 if a goal
is missed.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

from demo_setup import demo_arguments, demo_bench

SPEEDUP_GOAL = 1.7
ERROR_GOAL = 0.10


def main() -> None:
    ap = demo_arguments(__doc__.splitlines()[0], "results/bench-dtype", "bench/results/dtype.csv")
    ap.add_argument("--acceptance", type=float, default=None)
    args = ap.parse_args()

    import pandas as pd

    from specplan.contracts.calibration import Calibration
    from specplan.jsonio import load, write_atomic, write_json
    from specplan.planner.asking import make_ask
    from specplan.planner.search import search
    from specplan.validation.trials import VOID_OTHERS, rotated, run_fresh

    out = Path(args.out)
    bench = demo_bench(out, args.profile)
    profile, prompts, prompt_len = bench.profile, bench.workload, bench.prompt_len
    calibration = Path("results/demo/calibration/calibration.json")
    acceptance, calibrated = args.acceptance, None
    if acceptance is None and calibration.is_file():  # its curves too: pooled and per sequence
        rec = load(Calibration, calibration).acceptance[0]
        acceptance, calibrated = rec.per_token_acceptance_mle, str(calibration)
        where = f"the demo's calibration ({calibration}, with its curves)"
    else:
        where = "--acceptance"
    drafts = ("none", str(bench.draft)) if acceptance is not None else ("none",)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; profile {profile}; drafts "
          f"{', '.join(drafts)}" + (f" at acceptance {acceptance:.3f} from {where}" if acceptance is not None else ""))

    plans: dict[str, Path] = {}
    for name, dtype in (("profile's choice", None), ("float32", "float32")):
        ask = make_ask(str(bench.target), args.vram, None, None, profile, drafts,
                       None if calibrated else acceptance, calibrated, prompt_len, args.tokens, args.prompts, 3,
                       dtype=dtype)
        best = search(ask).plans[0]
        plans[name] = write_json(out / f"{best.policy.weight_dtype}-plan.json", best)
        p = best.prediction
        print(f"{name}: weights in {best.policy.weight_dtype}, draft {best.draft.label} g={best.policy.draft_len}, "
              f"batch {best.policy.num_batches}x{best.policy.decode_batch}; predicted {p.e2e_tok_s:.2f} tok/s "
              f"end-to-end, {p.decode_tok_s:.2f} decode-only")
    if len({str(p) for p in plans.values()}) < 2:
        sys.exit("the profile's choice is float32 here (no bf16 figures, or bf16 does not win): nothing to compare")

    rows: list[dict] = []
    for name, plan in plans.items():  # warm-up: writes the offload file in the plan's dtype, fills caches
        print(f"warm-up {name} ...", flush=True)
        run_fresh(plan, prompts, 2, out / f"warmup-{plan.stem}")
    for rep in range(args.repeat):
        for name, plan in rotated(list(plans.items()), rep + 1):
            for attempt in range(3):
                report, others = run_fresh(plan, prompts, args.prompts, out / f"{plan.stem}-{rep}")
                others = others or 0.0
                if others <= VOID_OTHERS:
                    break
                print(f"  void: other processes took {others:.0%} of the CPUs; again")
            m, pr = report["measured"], report["predicted"]
            rows.append({"run": rep, "contender": name, "weight_dtype": report["policy"]["weight_dtype"],
                         "draft_len": report["policy"]["draft_len"], "measured_e2e_tok_s": m["e2e_tok_s"],
                         "measured_decode_tok_s": m["decode_tok_s"], "predicted_e2e_tok_s": pr["e2e_tok_s"],
                         "predicted_decode_tok_s": pr["decode_tok_s"],
                         "signed_error_e2e": (pr["e2e_tok_s"] - m["e2e_tok_s"]) / m["e2e_tok_s"],
                         "others_cpu_fraction": others, "void": others > VOID_OTHERS})
            print(f"  run {rep} {name}: {m['e2e_tok_s']:.2f} tok/s end-to-end (predicted {pr['e2e_tok_s']:.2f}), "
                  f"{m['decode_tok_s']:.2f} decode-only; others {others:.0%}", flush=True)
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(args.csv), pd.DataFrame(rows).to_csv(index=False))

    frame = pd.DataFrame([r for r in rows if not r["void"]])
    med = {}
    for name, g in frame.groupby("contender", sort=False):
        e2e, dec, err = g.measured_e2e_tok_s, g.measured_decode_tok_s, g.signed_error_e2e
        med[name] = e2e.median()
        print(f"{name} ({g.weight_dtype.iloc[0]}): end-to-end {e2e.median():.2f} tok/s ({e2e.min():.2f}..{e2e.max():.2f}),"
              f" decode-only {dec.median():.2f} ({dec.min():.2f}..{dec.max():.2f}); prediction error "
              f"{statistics.median(err):+.1%} ({err.min():+.1%}..{err.max():+.1%}) over {len(g)} runs")
    ratio = med["profile's choice"] / med["float32"]
    worst = frame.groupby("contender").signed_error_e2e.median().abs().max()
    print(f"end-to-end speedup of the profile's dtype over float32 (medians, this run): {ratio:.2f}x "
          f"(goal >= {SPEEDUP_GOAL}x); worst median prediction error {worst:.1%} (goal <= {ERROR_GOAL:.0%})")
    sys.exit(0 if ratio >= SPEEDUP_GOAL and worst <= ERROR_GOAL else 1)


if __name__ == "__main__":
    main()
