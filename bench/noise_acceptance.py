"""Benchmark set-up for acceptance honesty (issue 15): the SmolLM2 draft's acceptance on demo targets built with more
per-expert perturbation, to pick the ``--noise`` of a target that accepts like a real draft/target pair (0.5-0.8
per token) rather than the ~0.93 of the demo target, which is upcycled from its own draft.

    python bench/noise_acceptance.py [--noise 0.04 0.5 1 2] [--experts 8] [--vram 1.0] [--draft-len 8]
                                     [--profile NAME|FILE] [--csv bench/results/noise_acceptance.csv]

For each noise: the demo target with that perturbation (``build_demo``, cached), the best plan with the SmolLM2
draft at ``--draft-len`` (the demo's calibration length), run greedy on the demo's 12 held-out calibration prompts
in its own fresh process, as the demo's calibration step runs it. Prints and writes (one row per noise and expert
count, atomically, after each, replacing an earlier row of the same noise and count) the per-token acceptance
(maximum-likelihood, ``calibration.json``), the accepted fraction of the proposals, the acceptance length (tokens
per sequence and verification) and the target's own greedy text on the
first prompt, so a reader sees the perturbed target still writes text. Acceptance is a count, not a timing: the
load of the machine does not change it.
"""

from __future__ import annotations

import json
from pathlib import Path

from demo_setup import demo_bench, run_or_exit


def main() -> None:
    import argparse

    from specplan.engine.build.models import DEMO_EXPERTS, DEMO_NOISE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, nargs="+", default=[DEMO_NOISE, 0.5, 1.0, 2.0])
    ap.add_argument("--experts", type=int, default=DEMO_EXPERTS)
    ap.add_argument("--vram", type=float, default=1.0)
    ap.add_argument("--draft-len", type=int, default=None, help="[default: the demo's calibration draft length]")
    ap.add_argument("--profile", default=None, help="profile [default: this machine's newest measured one]")
    ap.add_argument("--csv", default="bench/results/noise_acceptance.csv")
    ap.add_argument("--out", default="results/bench-noise")
    run_or_exit(run, ap.parse_args())


def run(args) -> None:
    import pandas as pd

    from specplan.jsonio import write_atomic
    from specplan.validation.demo import CALIBRATION_DRAFT_LEN, search_step
    from specplan.validation.trials import run_fresh

    g = args.draft_len or CALIBRATION_DRAFT_LEN
    csv = Path(args.csv)
    rows = pd.read_csv(csv).to_dict("records") if csv.exists() else []
    for noise in args.noise:
        out = Path(args.out) / f"noise{noise:g}"
        bench = demo_bench(out, args.profile, noise=noise, num_experts=args.experts)
        search_step(model=str(bench.target), vram=args.vram, profile_arg=bench.profile, prompt_len=bench.prompt_len,
                    gen_len=32, drafts=(str(bench.draft),), num_prompts=bench.held_out_count, draft_len=g,
                    output=out / "plan.json")
        report, _ = run_fresh(out / "plan.json", bench.held_out, None, out / "run")
        acc = json.loads((out / "run" / "calibration.json").read_text())["acceptance"][0]
        first = json.loads((out / "run" / "outputs.jsonl").read_text().splitlines()[0])
        row = {"noise": noise, "experts": args.experts, "target": bench.target.name, "draft": acc["draft"],
               "draft_len": report["acceptance"]["draft_len"],
               "per_token_acceptance_mle": acc["per_token_acceptance_mle"],
               "accepted_fraction": acc["accepted_fraction"], "proposed_tokens": acc["proposed_tokens"],
               "accepted_tokens": acc["accepted_tokens"],
               "acceptance_length": report["acceptance"]["tokens_per_seq_round_measured"],
               "prompts": bench.held_out_count, "first_output": first["generated_text"][:120]}
        rows = [r for r in rows if (r["noise"], r["experts"]) != (noise, args.experts)] + [row]
        print(f"noise {noise:g}: per-token acceptance {row['per_token_acceptance_mle']:.3f}, accepted "
              f"{row['accepted_tokens']} of {row['proposed_tokens']} proposals ({row['accepted_fraction']:.3f}), "
              f"{row['acceptance_length']:.2f} tokens per verification at g={row['draft_len']}; the target writes: "
              f"{row['first_output']!r}", flush=True)
        csv.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(csv, pd.DataFrame(rows).sort_values(["experts", "noise"]).to_csv(index=False))
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
