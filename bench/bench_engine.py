"""Benchmark: disk-bound plans on the demo MoE; goals: the disk busy >= 85% of decode, throughput >= 0.85 of the bound.

    python bench/bench_engine.py [--profile NAME|FILE] [--vram 1.0] [--prompts 16] [--tokens 32] [--repeat 3]
                                 [--csv bench/results/engine.csv]

The demo target (SmolLM2 upcycled into a Mixtral-architecture MoE, built and cached on first use) is searched under
a resident budget of ``--vram`` GiB (most experts on disk): the best plans without a draft that fetch whole layers
and only the routed experts (the disk-bound plans the goals are about), and the best speculative plans with
SmolLM2 as the draft, with one and with two interleaved batches, at the draft acceptance measured first on held-out
prompts. Each plan runs as ``specplan run --fixed-length`` in its own fresh process (``validation.trials``), the
plans interleaved, ``--repeat`` times, with O_DIRECT reads, in the dtype the search chose from the profile. Per run, from the measured timeline: the
disk's busy fraction of decode, and the decode throughput against the bound "busiest resource 100% busy" (the
tokens of a steady-state round over the largest per-resource busy time of that round, as the planner costs it from
the profile); the speculative plans' speedup over the best plan without a draft, paired run by run. Prints medians
and ratios measured in this one benchmark; exits 1 if a median of a disk-bound plan misses a goal.
A VM's disk changes speed from minute to minute (1.1 to 2.5 GB/s seen here within an hour, the profile an hour old
is off by that much): the O_DIRECT read of the offload file itself is measured again before and after each run (the
profiler's per-size reads, then a 1.5 s stream for the sustained figure), and the bound of the goal, like a second
prediction, is costed with that disk; the stored profile's bound and prediction are printed beside them.

Writes one row per run to ``--csv`` (a committed artifact that ``notebooks/engine_fidelity.ipynb`` plots): measured,
simulated (the simulator on the same plan and workload, seed 0) and predicted decode throughput, the roofline bound,
busy fractions, and the signed errors ``(predicted - measured) / measured``.
"""

from __future__ import annotations

import os
import statistics
import sys

from demo_setup import demo_arguments, demo_bench

MiB = 1 << 20
DISK_BUSY_GOAL = 0.85
BOUND_GOAL = 0.85
STREAM_S = 1.5  # seconds of back-to-back 64 MiB reads of the offload file before and after each run


def decode_bound_tok_s(plan, report: dict) -> tuple[float, str]:
    """Decode tokens per second if the busiest resource were busy all the time: the tokens of one steady-state round
    over the largest per-resource busy time of that round, as the planner costs it from the plan's profile for the
    workload the run had (``report``: its result.json)."""
    from specplan.planner.predict import predict
    from specplan.validation.calibrate import ran_workload

    pred = predict(plan.model_copy(update={"workload": ran_workload(plan, report), "prediction": None}))
    resource = max(pred.round_busy_s, key=pred.round_busy_s.get)
    return pred.tokens_per_round / pred.round_busy_s[resource], resource


def disk_now(profile, path):
    """``profile`` with its O_DIRECT read link measured again now on the engine's own offload file ``path`` (real
    data: 4 KiB / 8 MiB / 64 MiB reads round-robin, then a stream of 64 MiB reads for the sustained figure): a VM's
    disk changes speed from minute to minute, so the bound of a run is costed with the disk as it was around it."""
    from specplan.engine.measure.links import measure_file_read, measure_file_stream

    link = measure_file_read(path, (8 * MiB, 64 * MiB), 4)
    link = link.model_copy(update={"sustained_Bps": measure_file_stream(path, 64 * MiB, STREAM_S)})
    return profile.model_copy(update={"links": {**profile.links, "disk_read_direct": link}})


def achieved_read_Bps(timeline) -> float:
    """Bytes over busy seconds of the run's disk reads (what the engine got from the disk)."""
    reads = [e for e in timeline.events if e.resource == "disk_read" and e.bytes]
    busy = sum(e.end_s - e.start_s for e in reads)
    return sum(e.bytes for e in reads) / busy if busy > 0 else 0.0


def main() -> None:
    ap = demo_arguments(__doc__.splitlines()[0], "results/bench-engine", "bench/results/engine.csv")
    args = ap.parse_args()

    from pathlib import Path

    from specplan.catalog import load_profile
    from specplan.contracts.plan import Plan
    from specplan.contracts.timeline import Timeline
    from specplan.engine.execute.results import decode_busy_fraction
    from specplan.engine.io.offload import ensure_offload
    from specplan.engine.model.checkpoint import open_checkpoint
    from specplan.jsonio import load, write_atomic, write_json
    from specplan.planner.asking import make_ask
    from specplan.planner.search import search
    from specplan.validation.calibrate import predicted, ran_workload
    from specplan.validation.compare import simulated_at
    from specplan.validation.trials import Contender, run_fresh, run_trials

    out_dir = Path(args.out)
    bench = demo_bench(out_dir, args.profile)
    profile = load_profile(bench.profile)
    files = {"held_out": bench.held_out, "workload": bench.workload}
    prompt_len = bench.prompt_len
    print(f"{bench.target.name} on {profile.name}: {args.prompts} prompts x {args.tokens} tokens, resident budget "
          f"{args.vram:g} GiB; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    def searched(drafts: tuple[str, ...], acceptance: float | None, n: int) -> list:
        return search(make_ask(str(bench.target), args.vram, None, None, bench.profile, drafts, acceptance, None,
                               prompt_len, args.tokens, n, 50)).plans

    calib_plan = write_json(out_dir / "calibration" / "plan.json", searched((str(bench.draft),), None,
                                                                            bench.held_out_count)[0])
    calib, _ = run_fresh(calib_plan, files["held_out"], bench.held_out_count, out_dir / "calibration" / "run")
    acceptance = calib["acceptance"]["measured"]
    print(f"draft {bench.draft.name}: acceptance {acceptance:.3f} per token measured on {bench.held_out_count} held-out "
          f"prompts ({calib['acceptance']['sequence_rounds']} sequence-rounds)")
    found = searched(("none", str(bench.draft)), acceptance, args.prompts)

    def best(test) -> object | None:
        return next((p for p in found if test(p.policy)), None)

    plans = {"no draft, fetch layer": best(lambda q: not q.speculative and q.expert_fetch == "layer"),
             "no draft, fetch routed": best(lambda q: not q.speculative and q.expert_fetch == "routed"),
             "draft, 1 batch": best(lambda q: q.speculative and q.num_batches == 1),
             "draft, 2 batches": best(lambda q: q.speculative and q.num_batches == 2)}
    for name in [n for n, p in plans.items() if p is None]:
        print(f"{name}: no plan among the searched ones")
    plans = {n: p for n, p in plans.items() if p is not None}
    dtype = next(iter(plans.values())).policy.weight_dtype
    offload = ensure_offload(open_checkpoint(bench.target), dtype).path  # the disk is measured on the file read
    contenders = [Contender(n, write_json(out_dir / n.replace(", ", "-").replace(" ", "_") / "plan.json", p),
                            out_dir / n.replace(", ", "-").replace(" ", "_")) for n, p in plans.items()]
    disk: dict[tuple[str, int], tuple] = {}

    def around(trials) -> None:  # the disk measured again after each trial (and so before the next one)
        t = trials[-1]
        disk[(t.contender, t.rep)] = (last[0], disk_now(profile, offload))
        last[0] = disk[(t.contender, t.rep)][1]

    last = [disk_now(profile, offload)]
    trials = run_trials(contenders, files["workload"], args.prompts, args.repeat, resume=False, on_trial=around)
    runs: dict[str, list[dict]] = {n: [] for n in plans}
    for t in trials:
        plan = load(Plan, next(c.plan_file for c in contenders if c.name == t.contender))
        timeline = load(Timeline, Path(t.folder) / "timeline.json")
        before, after = disk[(t.contender, t.rep)]
        stored, resource = decode_bound_tok_s(plan, t.report)
        now = statistics.mean(decode_bound_tok_s(plan.model_copy(update={"profile": p}), t.report)[0]
                              for p in (before, after))
        disk_Bps = statistics.mean(p.link("disk_read_direct").sustained_Bps.median for p in (before, after))
        sim = simulated_at(plan, ran_workload(plan, t.report)).summary.decode_tok_s
        r = row(plan, timeline, t.report, decode_busy_fraction(plan, timeline), sim, resource, stored, now, disk_Bps)
        r["predicted_now_decode_tok_s"] = statistics.mean(predicted(plan, p, t.report)["decode_tok_s"]
                                                          for p in (before, after))
        r["signed_error_predicted_now"] = ((r["predicted_now_decode_tok_s"] - r["measured_decode_tok_s"])
                                           / r["measured_decode_tok_s"])
        runs[t.contender].append({"plan": t.contender, **r})
    misses, rows = 0, []
    for name, plan in plans.items():
        rs = runs[name]
        rows += rs
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
        of_now = statistics.median(r["measured_decode_tok_s"] / r["bound_now_decode_tok_s"] for r in rs)
        of_stored = statistics.median(r["measured_decode_tok_s"] / r["bound_decode_tok_s"] for r in rs)
        got = statistics.median(r["achieved_read_Bps"] / r["disk_now_sustained_Bps"] for r in rs)
        pol = plan.policy
        each = ", ".join(f"{r['measured_decode_tok_s']:.2f}" for r in rs)
        print(f"{name}: {pol.num_batches} x {pol.decode_batch}, draft length {pol.draft_len}, fetch "
              f"{pol.expert_fetch}, prefetch depth {pol.prefetch_depth}, weights in {pol.weight_dtype}: decode "
              f"{med['measured_decode_tok_s']:.2f} tok/s median (runs {each}, each in its own process); disk busy "
              f"{med['disk_busy_fraction_decode']:.0%} of decode, the engine's reads at "
              f"{med['achieved_read_Bps'] / 1e9:.2f} GB/s = {got:.2f} x the disk's stream measured around each run "
              f"({med['disk_now_sustained_Bps'] / 1e9:.2f} GB/s; the stored profile says "
              f"{profile_64MiB_Bps(profile) / 1e9:.2f})")
        print(f"  signed error of the prediction {med['signed_error_predicted']:+.1%} with the stored profile, "
              f"{med['signed_error_predicted_now']:+.1%} with the disk measured around each run; of the simulation "
              f"{med['signed_error_simulated']:+.1%} (stored profile)")
        if not pol.speculative:  # the goals are the disk-bound plans'
            ok = med["disk_busy_fraction_decode"] >= DISK_BUSY_GOAL and of_now >= BOUND_GOAL
            misses += not ok
            print(f"  {rs[0]['bound_resource']} 100% busy bounds it at {med['bound_now_decode_tok_s']:.2f} tok/s with "
                  f"the disk measured around each run (at {med['bound_decode_tok_s']:.2f} with the stored profile): "
                  f"throughput / bound {of_now:.2f} ({of_stored:.2f}); goals: disk busy >= {DISK_BUSY_GOAL:.0%} and "
                  f"throughput / bound >= {BOUND_GOAL}: {'meets' if ok else 'MISSES'}")
    speedups(runs)
    if args.csv and rows:
        import pandas as pd

        path = write_atomic(args.csv, pd.DataFrame(rows).to_csv(index=False))
        print(f"wrote {len(rows)} rows to {path}")
    sys.exit(1 if misses else 0)


def speedups(runs: dict[str, list[dict]]) -> None:
    """Each speculative plan over the best plan without a draft, run by run (the same repeat: the same disk)."""
    base = [n for n in runs if n.startswith("no draft")]
    if not base:
        return
    fastest = max(base, key=lambda n: statistics.median(r["predicted_decode_tok_s"] for r in runs[n]))
    for name in [n for n in runs if not n.startswith("no draft")]:
        pairs = list(zip(runs[name], runs[fastest]))
        meas = statistics.median(a["measured_decode_tok_s"] / b["measured_decode_tok_s"] for a, b in pairs)
        pred = statistics.median(a["predicted_decode_tok_s"] / b["predicted_decode_tok_s"] for a, b in pairs)
        print(f"{name} over '{fastest}': decode-only speedup measured {meas:.2f}x (median of {len(pairs)} paired "
              f"runs), predicted {pred:.2f}x")


def profile_64MiB_Bps(profile) -> float:
    return 64 * MiB / profile.link("disk_read_direct").time_s(64 * MiB)


def row(plan, timeline, report: dict, busy: dict, simulated: float, resource: str, bound: float, bound_now: float,
        disk_now_Bps: float) -> dict:
    m, p = report["measured"], report["predicted"]
    acc = report.get("acceptance") or {}
    return {"model": plan.model.name, "profile": plan.profile.name, "expert_fetch": plan.policy.expert_fetch,
            "decode_batch": plan.policy.decode_batch, "num_batches": plan.policy.num_batches,
            "draft_len": plan.policy.draft_len, "acceptance_assumed": acc.get("assumed"),
            "acceptance_measured": acc.get("measured"), "prefetch_depth": plan.policy.prefetch_depth,
            "device_budget_bytes": plan.capacities.device_bytes, "num_prompts": report["workload"]["num_prompts"],
            "gen_len": report["workload"]["gen_len"], "prompt_len_mean": report["workload"]["prompt_len_mean"],
            "measured_decode_tok_s": m["decode_tok_s"], "simulated_decode_tok_s": simulated,
            "predicted_decode_tok_s": p["decode_tok_s"], "bound_decode_tok_s": bound,
            "bound_now_decode_tok_s": bound_now, "bound_resource": resource,
            "measured_e2e_tok_s": m["e2e_tok_s"], "predicted_e2e_tok_s": p["e2e_tok_s"],
            "profile_64MiB_Bps": profile_64MiB_Bps(plan.profile), "disk_now_sustained_Bps": disk_now_Bps,
            "achieved_read_Bps": achieved_read_Bps(timeline),
            "disk_busy_fraction_decode": busy.get("disk_read", 0.0),
            "compute_busy_fraction_decode": busy.get("device_compute", 0.0),
            "prefetch_wait_s": float(report["wait_s"].get("prefetch_wait_s", 0.0)),
            "signed_error_predicted": (p["decode_tok_s"] - m["decode_tok_s"]) / m["decode_tok_s"],
            "signed_error_simulated": (simulated - m["decode_tok_s"]) / m["decode_tok_s"],
            "o_direct": bool(report["o_direct"])}


if __name__ == "__main__":
    main()
