"""Benchmark: specplan against what users run today on a model larger than their memory, at the same memory limit.

    python bench/peers.py [--limit-gib 1.5] [--vram 0.75] [--prompts 8] [--tokens 16] [--repeat 3]
                          [--prompts-file FILE] [--contenders accelerate,assisted,...] [--noise X] [--experts N]
                          [--profile NAME|FILE] [--calibration FILE] [--trial-timeout 900]
                          [--csv bench/results/peers.csv] [--png bench/results/peers.png] [--out results/bench-peers]

Same weights (the demo target, SmolLM2-135M upcycled into a Mixtral-architecture MoE, built by ``build_demo``), same
prompts (the bundled ones after the demo's held-out calibration prompts, or ``--prompts-file``'s such as the bundled
``profiles/prompts/chat64.txt``, each one user message of the chat
template, the same token ids for every contender), the same number of new tokens (fixed length, EOS ignored),
greedy, the same precision (the dtype of specplan's plans: the planner's choice for this machine's profile), and
one memory limit for all (``peers_harness.METHOD``: a cgroup v1 group, page cache included; cold cache before every
run). Each run is a fresh process; the contenders interleave, the order rotated each repetition (A B C, B C A, C A B:
``validation.trials.rotated``), ``--repeat`` times.

Contenders: ``accelerate`` (transformers ``device_map="auto"``, ``max_memory`` = ``--vram`` GiB of CPU memory,
``offload_folder``: the rest on disk; all prompts in one left-padded batch), ``assisted`` (the same with
``assistant_model`` = the demo draft; one prompt at a time, as transformers runs it), ``specplan-nodraft`` (the best
plan without a draft at a resident budget of ``--vram`` GiB), ``specplan-draft`` (the best plan with the draft, at its
measured acceptance) and ``specplan-best`` (the planner's choice between no draft and the draft: one of the other two,
so measuring them says whether it chose the faster), each as ``specplan run --fixed-length``, and ``llamacpp-f32`` /
``llamacpp-bf16`` (``peers_llamacpp``: llama.cpp vendored in the llama-cpp-python sdist, built once, the model
converted to an f32 / bf16 GGUF by llama.cpp's own converter, ``llama-server`` with one parallel slot per prompt and
its mmap loading) and ``llamacpp-bf16-draft`` (the same with llama.cpp's own draft-model speculative decoding, the
demo draft converted the same way, its defaults).

``--noise`` builds the demo target with more per-expert perturbation (``bench/noise_acceptance.py`` measures the
draft's acceptance per noise): the demo target, upcycled from its own draft, accepts ~0.93 of its tokens, more than
real pairs (0.5-0.8). ``--experts`` builds it with more experts per layer: a model that does not fit the limit at
bf16, where llama.cpp's mmap'd file cannot stay in the page cache.

Throughput figures, all over the tokens asked for (prompts x tokens): end-to-end = the whole process (start,
imports, load, prefill, decode); generation = prefill + decode after the load; decode-only = after each
sequence's first new token; time to first token from the start of generation. Peak memory: the process's own
VmHWM and the group's peak (page cache included). specplan's rows add the fraction of decode time its own timeline
shows the disk reading (``decode_busy_fraction``). Greedy outputs are compared token for token with the first
contender's that finished. Writes one row per run to ``--csv``, the summary beside it (``peers.json``), a bar chart to
``--png``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import peers_llamacpp
from demo_setup import run_or_exit
from peers_harness import (METHOD, Run, compare_tokens, fmt, fmt_spread, make_group, ratio_of_medians,
                           remove_group, run_in_group, spread, table)

from specplan.errors import SpecplanError
from specplan.fmt import human_bytes
from specplan.validation.trials import rotated

CONTENDERS = ("accelerate", "assisted", "llamacpp-f32", "llamacpp-bf16", "llamacpp-bf16-draft", "specplan-nodraft",
              "specplan-draft", "specplan-best")
#: specplan's plans: the drafts each one's search may choose ("draft": the demo draft)
SPECPLAN_DRAFTS = {"specplan-nodraft": ("none",), "specplan-draft": ("draft",), "specplan-best": ("none", "draft")}
#: the GGUFs each llama.cpp contender runs: (its model, its draft or None), as (demo model, outtype)
LLAMA_GGUFS = {"llamacpp-f32": (("target", "f32"), None), "llamacpp-bf16": (("target", "bf16"), None),
               "llamacpp-bf16-draft": (("target", "bf16"), ("draft", "bf16"))}
HERE = Path(__file__).resolve().parent
GIB = 1 << 30
FIGURES = ("e2e_tok_s", "gen_tok_s", "decode_tok_s", "ttft_s", "startup_load_s", "peak_rss_bytes",
           "group_peak_bytes", "accepted_fraction", "disk_busy_fraction", "delivered_fraction", "predicted_gen_tok_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit-gib", type=float, default=1.5, help="the memory limit of every run, page cache included")
    # at 1.0 GiB under a 1.5 GiB limit, specplan's plan (1.0 GiB + 0.5 GiB measured process headroom) leaves no room
    # for the page cache the group is charged with, and its compute ran 25x slower (libraries' pages evicted)
    ap.add_argument("--vram", type=float, default=0.75, help="resident weight budget in GiB (specplan's plans, "
                                                            "transformers' max_memory)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompts-file", default=None, help="the workload's prompts, one per line [default: the "
                                                         "bundled ones after the held-out calibration prompts]")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--noise", type=float, default=None, help="the demo target's per-expert perturbation (a larger "
                                                             "one lowers the draft's acceptance)")
    ap.add_argument("--experts", type=int, default=None, help="the demo target's experts per layer (more: a larger "
                                                              "model, one that does not fit the limit at bf16)")
    ap.add_argument("--profile", default=None, help="profile [default: this machine's newest measured one]")
    ap.add_argument("--calibration", default=None, help="the draft's measured acceptance [default: measured here]")
    ap.add_argument("--trial-timeout", type=float, default=900.0)
    ap.add_argument("--llama-sdist", default=None,
                    help="the llama-cpp-python sdist whose vendored llama.cpp is built once [default: downloaded from "
                         "PyPI into $SPECPLAN_HOME/llama.cpp]")
    ap.add_argument("--csv", default="bench/results/peers.csv")
    ap.add_argument("--png", default="bench/results/peers.png")
    ap.add_argument("--out", default="results/bench-peers")
    run_or_exit(run, ap.parse_args())


def run(args) -> None:
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONTENDERS]
    if unknown or not names:
        raise SpecplanError(f"--contenders: unknown {', '.join(unknown) or '(none)'}; use some of "
                            f"{', '.join(CONTENDERS)}")
    limit = int(args.limit_gib * GIB)
    group = make_group(limit)  # fails in one line before any set-up where the limit cannot be applied
    try:
        setup = prepare(args, names)
        commands = {n: contender_command(n, setup, args) for n in names}
        runs = []
        for rep in range(1, args.repeat + 1):
            for name in rotated(names, rep):
                folder = setup["out"] / name / f"rep{rep}"
                r = run_in_group(commands[name](folder), group, folder / "run.log", args.trial_timeout,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                row = read_run(name, rep, r, folder, setup)
                shutil.rmtree(folder / "offload", ignore_errors=True)  # transformers' offloaded weights of this run
                runs.append(row)
                print(f"{name} run {rep}/{args.repeat} (fresh process, {args.limit_gib:g} GiB limit, "
                      f"{'cold' if r.cold_cache else 'WARM'} cache): {row['status']}, "
                      f"end-to-end {fmt(row['e2e_tok_s'])} tok/s, generation {fmt(row['gen_tok_s'])}, decode-only "
                      f"{fmt(row['decode_tok_s'])}", flush=True)
    finally:
        remove_group(group)
    report(runs, names, setup, args, limit)


def prepare(args, names: list[str]) -> dict:
    """Models, profile, prompts (text and token ids), calibration and specplan's two plans."""
    from specplan.catalog import measured_profiles, user_dir
    from specplan.contracts.calibration import Calibration
    from specplan.contracts.plan import Plan
    from specplan.engine.build.models import build_demo
    from specplan.engine.model.checkpoint import open_checkpoint
    from specplan.jsonio import load, write_atomic, write_json
    from specplan.validation.demo import CALIBRATION_DRAFT_LEN, CALIBRATION_PROMPTS, longest_prompt, search_step
    from specplan.validation.runs import encode_prompts, read_prompts
    from specplan.validation.trials import run_fresh

    demo = build_demo(log=print, **{k: v for k, v in (("noise", args.noise), ("num_experts", args.experts))
                                    if v is not None})
    profile = args.profile or (str(measured_profiles()[0]) if measured_profiles() else None)
    if profile is None:
        raise SpecplanError("no measured profile of this machine: run `specplan profile --quick` first")
    out = Path(args.out)
    texts = read_prompts(None)
    held_out, workload = texts[:CALIBRATION_PROMPTS], texts[CALIBRATION_PROMPTS:]
    if args.prompts_file:
        workload = read_prompts(args.prompts_file)
        texts = held_out + workload
    if args.prompts > len(workload):
        raise SpecplanError(f"--prompts {args.prompts}: the workload has {len(workload)} prompts; give a "
                            f"--prompts-file with more")
    workload = workload[:args.prompts]
    files = {n: write_atomic(out / f"{n}.txt", "\n".join(t) + "\n") for n, t in (("held_out", held_out),
                                                                                 ("workload", workload))}
    prompt_len = longest_prompt(demo.target, texts)
    common = dict(model=str(demo.target), vram=args.vram, profile_arg=profile, prompt_len=prompt_len,
                  gen_len=args.tokens)
    calibration = args.calibration
    if calibration is None:  # the draft's acceptance on the held-out prompts, as the demo measures it
        search_step(**common, drafts=(str(demo.draft),), num_prompts=len(held_out), top=1,
                    output=out / "calibration" / "plan.json", draft_len=CALIBRATION_DRAFT_LEN)
        run_fresh(out / "calibration" / "plan.json", files["held_out"], None, out / "calibration" / "run")
        calibration = str(out / "calibration" / "run" / "calibration.json")
    mine = [n for n in SPECPLAN_DRAFTS if n in names or n == "specplan-best"]  # best: the dtype every contender runs
    for name in mine:
        drafts = tuple(str(demo.draft) if d == "draft" else d for d in SPECPLAN_DRAFTS[name])
        search_step(**common, drafts=drafts, calibration=calibration if "draft" in SPECPLAN_DRAFTS[name] else None,
                    num_prompts=args.prompts, top=1, output=out / name / "plan.json")
    plans = {n: load(Plan, out / n / "plan.json") for n in mine}
    sdist = (Path(args.llama_sdist) if args.llama_sdist else
             user_dir() / "llama.cpp" / f"llama_cpp_python-{peers_llamacpp.SDIST_VERSION}.tar.gz")
    wanted = sorted({g for n in names if n in LLAMA_GGUFS for g in LLAMA_GGUFS[n] if g is not None})
    llama = None
    if wanted:
        models = {"target": demo.target, "draft": demo.draft}
        bin_dir, ggufs = peers_llamacpp.setup(sdist, user_dir() / "llama.cpp", [(models[m], t) for m, t in wanted])
        llama = (bin_dir, dict(zip(wanted, ggufs)))
    dtype = plans["specplan-best"].policy.weight_dtype
    ids = encode_prompts(open_checkpoint(demo.target).tokenizer(), workload)
    return {"out": out, "target": demo.target, "draft": demo.draft, "profile": profile, "dtype": dtype,
            "prompts_file": files["workload"], "ids_file": write_json(out / "prompt_ids.json", ids),
            "plans": plans, "calibration": calibration, "acceptance": load(Calibration, calibration).acceptance[0],
            "llama": llama, "asked_tokens": args.prompts * args.tokens}


def contender_command(name: str, setup: dict, args):
    """A function of the run's folder giving the command line of one run of ``name``."""
    if name.startswith("specplan"):
        plan = setup["out"] / name / "plan.json"
        return lambda folder: [sys.executable, "-m", "specplan", "run", str(plan), "--fixed-length", "--prompts",
                               str(setup["prompts_file"]), "--num-prompts", str(args.prompts), "--max-new-tokens",
                               str(args.tokens), "-o", str(folder)]
    if name in LLAMA_GGUFS:
        bin_dir, ggufs = setup["llama"]
        model, draft = LLAMA_GGUFS[name]
        return lambda folder: [sys.executable, str(HERE / "peers_llamacpp.py"), "run", "--bin", str(bin_dir), "--gguf",
                               str(ggufs[model]), "--ids", str(setup["ids_file"]), "--tokens", str(args.tokens), "-o",
                               str(folder / "result.json"), *(("--draft", str(ggufs[draft])) if draft else ())]
    hf = [sys.executable, str(HERE / "peers_hf.py"), "--model", str(setup["target"]), "--ids", str(setup["ids_file"]),
          "--tokens", str(args.tokens), "--dtype", setup["dtype"], "--max-memory-bytes", str(int(args.vram * GIB)),
          *(("--assistant", str(setup["draft"])) if name == "assisted" else ())]
    return lambda folder: [*hf, "--offload-folder", str(folder / "offload"), "-o", str(folder / "result.json")]


def read_run(name: str, rep: int, r: Run, folder: Path, setup: dict) -> dict:
    """One row: how the run ended and its figures over the tokens asked for (None where it cannot tell)."""
    row = {"contender": name, "rep": rep, "status": r.status, "returncode": r.returncode, "wall_s": r.wall_s,
           "cold_cache": r.cold_cache, "group_peak_bytes": r.group_peak_bytes, "e2e_tok_s": None, "gen_tok_s": None,
           "decode_tok_s": None, "ttft_s": None, "startup_load_s": None, "accepted_fraction": None,
           "peak_rss_bytes": None, "generated_tokens": None, "token_ids": None, "draft_tokens": None,
           "draft_accepted_tokens": None, "disk_busy_fraction": None, "delivered_fraction": None,
           "predicted_gen_tok_s": None, "dtype": setup["dtype"], "log": str(r.log)}
    if r.status != "ok":
        return row
    if name.startswith("specplan"):
        res = json.loads((folder / "result.json").read_text())
        m = res["measured"]
        ids = [json.loads(line)["token_ids"] for line in (folder / "outputs.jsonl").read_text().splitlines()
               if line.strip()]
        acc = res.get("acceptance") or {}
        row.update(gen_tok_s=m["e2e_tok_s"], decode_tok_s=m["decode_tok_s"], ttft_s=m["ttft_s"],
                   startup_load_s=r.wall_s - m["total_s"], peak_rss_bytes=res["resident"]["peak_rss_bytes"],
                   generated_tokens=m["generated_tokens"], token_ids=ids, draft_tokens=acc.get("proposed_tokens"),
                   draft_accepted_tokens=acc.get("accepted_tokens"),
                   disk_busy_fraction=m["decode_busy_fraction"].get("disk_read", 0.0),
                   predicted_gen_tok_s=res["predicted"]["e2e_tok_s"])  # the planner's, for the workload measured
    else:
        res = json.loads((folder / "result.json").read_text())
        row.update(gen_tok_s=res["gen_tok_s"], decode_tok_s=res["decode_tok_s"], ttft_s=res["ttft_s"],
                   startup_load_s=res["startup_s"] + res["load_s"], peak_rss_bytes=res["peak_rss_bytes"],
                   generated_tokens=res["generated_tokens"], token_ids=res["token_ids"],
                   draft_tokens=res.get("draft_tokens") or None, draft_accepted_tokens=res.get("draft_accepted_tokens"),
                   dtype=res["dtype"])
    if row["draft_tokens"]:
        row["accepted_fraction"] = row["draft_accepted_tokens"] / row["draft_tokens"]
    asked = setup["asked_tokens"]
    row["delivered_fraction"] = row["generated_tokens"] / asked
    if row["generated_tokens"] != asked and not (name in LLAMA_GGUFS and res["decode_tokens"] == asked):
        row["status"] = f"wrong length ({row['generated_tokens']} tokens, {asked} asked)"
        return row
    # llama.cpp's speculative path may send a few tokens fewer than it generated (``peers_llamacpp``): over those sent
    row["e2e_tok_s"] = min(asked, row["generated_tokens"]) / r.wall_s
    return row


def summarise(runs: list[dict], names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        mine = [r for r in runs if r["contender"] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        entry = {"runs": len(mine), "ok_runs": len(ok), "statuses": sorted({r["status"] for r in mine})}
        for key in FIGURES:
            entry[key] = spread([r[key] for r in ok if r[key] is not None])
        out[name] = entry
    first = {n: next((r["token_ids"] for r in runs if r["contender"] == n and r["status"] == "ok"), None)
             for n in names}
    reference = next((n for n in names if first[n] is not None), None)
    for name in names:
        same = compare_tokens(first[reference], first[name]) if first[name] is not None else None
        out[name]["tokens_vs"] = reference
        out[name]["tokens"] = same
    return out


def report(runs: list[dict], names: list[str], setup: dict, args, limit: int) -> None:
    import pandas as pd

    from specplan.jsonio import write_atomic, write_json

    s = summarise(runs, names)
    base = s.get("accelerate")
    rows = []
    for name in names:
        e = s[name]
        t = e["tokens"]
        rows.append({"name": name, "ok": f"{e['ok_runs']}/{e['runs']}" + ("" if e["ok_runs"] == e["runs"] else
                                                                         f" ({', '.join(e['statuses'])})"),
                     "e2e": fmt_spread(e["e2e_tok_s"]), "gen": fmt_spread(e["gen_tok_s"]),
                     "dec": fmt_spread(e["decode_tok_s"]), "ttft": fmt_spread(e["ttft_s"]),
                     "rss": fmt(e["peak_rss_bytes"] and e["peak_rss_bytes"]["median"] / GIB),
                     "grp": fmt(e["group_peak_bytes"] and e["group_peak_bytes"]["median"] / GIB),
                     "x": fmt(ratio_of_medians(e["e2e_tok_s"], base and base["e2e_tok_s"])),
                     "xg": fmt(ratio_of_medians(e["gen_tok_s"], base and base["gen_tok_s"])),
                     "load": fmt_spread(e["startup_load_s"], ".1f"),
                     "acc": fmt(e["accepted_fraction"] and e["accepted_fraction"]["median"]),
                     "disk": fmt(e["disk_busy_fraction"] and e["disk_busy_fraction"]["median"]),
                     "sent": fmt(e["delivered_fraction"] and e["delivered_fraction"]["min"]),
                     "pred": fmt(e["predicted_gen_tok_s"] and e["predicted_gen_tok_s"]["median"]),
                     "same": "-" if t is None else f"{t['identical_seqs']}/{t['seqs']}"
                                                   + (f" (from token {t['first_divergence']})"
                                                      if t["identical_seqs"] < t["seqs"] else "")})
    text = table(rows, [("name", "contender"), ("ok", "runs ok"), ("e2e", "end-to-end tok/s (incl. load)"),
                        ("gen", "generation tok/s (prefill+decode)"), ("pred", "generation predicted"),
                        ("dec", "decode-only tok/s"),
                        ("ttft", "TTFT s"), ("load", "start+load s"), ("rss", "peak RSS GiB"), ("grp", "group peak GiB"),
                        ("x", "e2e / accelerate"), ("xg", "gen / accelerate"), ("acc", "drafts accepted"),
                        ("disk", "disk busy in decode"), ("sent", "tokens sent / asked (min)"),
                        ("same", "same tokens")])
    reference = next(iter(s.values()))["tokens_vs"]
    a = setup["acceptance"]
    target = setup["target"]
    target_bytes = setup["plans"]["specplan-best"].model.spec.weight_bytes(setup["dtype"])
    planner = regret_lines(s, setup["plans"])
    others = sorted({f"{r['contender']}: {r['dtype']}" for r in runs if r["dtype"] != setup["dtype"]})
    lines = [f"{args.prompts} prompts x {args.tokens} new tokens (fixed length, EOS ignored), greedy, "
             f"{setup['dtype']}" + (f" ({', '.join(others)})" if others else "")
             + f", memory limit {limit / GIB:g} GiB for every run; {METHOD}",
             f"target {target.name} ({human_bytes(target_bytes)} of weights in {setup['dtype']}); the draft accepted "
             f"{a.accepted_tokens} of {a.proposed_tokens} proposals on the held-out prompts (per token "
             f"{a.per_token_acceptance_mle:.3f}, the figure specplan's search used)",
             f"medians (min..max) of {args.repeat} runs each, every run a fresh process, interleaved; tokens "
             f"compared with {reference}'s; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", text, *planner]
    print("\n".join(lines))
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(args.csv), pd.DataFrame([{k: v for k, v in r.items() if k != "token_ids"}
                                               for r in runs]).to_csv(index=False))
    write_json(Path(args.csv).with_suffix(".json"), {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "limit_bytes": limit, "method": METHOD,
        "prompts": args.prompts, "tokens": args.tokens, "repeat": args.repeat, "dtype": setup["dtype"],
        "vram_gib": args.vram, "profile": setup["profile"], "calibration": setup["calibration"],
        "target": str(target), "target_weight_bytes": target_bytes, "noise": args.noise,
        "experts": args.experts, "draft_acceptance": a.model_dump(),
        "command": " ".join(["python", *sys.argv]), "contenders": s, "table": text,
        "planner": planner})
    chart(s, names, Path(args.png), lines[0])


def regret_lines(s: dict, plans: dict) -> list[str]:
    """Whether the planner chose the fastest of specplan's measured plans: its regret on generation throughput."""
    measured = {n: s[n]["gen_tok_s"]["median"] for n in SPECPLAN_DRAFTS if n in s and s[n]["gen_tok_s"]}
    if "specplan-best" not in measured or len(measured) < 2:
        return []
    fastest = max(measured, key=measured.get)
    pol = plans["specplan-best"].policy
    chose = f"draft length {pol.draft_len}" if pol.draft_len else "no draft"
    return [f"planner's choice (specplan-best, {chose}, {pol.num_batches} x {pol.decode_batch}): "
            f"{measured['specplan-best']:.2f} tok/s generation; fastest of specplan's measured plans: {fastest} "
            f"{measured[fastest]:.2f}; regret {measured[fastest] / measured['specplan-best']:.2f}"]


def chart(s: dict, names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.4
    for i, (key, label) in enumerate((("e2e_tok_s", "end-to-end (incl. load)"), ("gen_tok_s", "generation"))):
        med = [s[n][key]["median"] if s[n][key] else 0.0 for n in names]
        err = [[m - s[n][key]["min"] if s[n][key] else 0.0 for n, m in zip(names, med)],
               [s[n][key]["max"] - m if s[n][key] else 0.0 for n, m in zip(names, med)]]
        ax.bar([j + (i - 0.5) * width for j in range(len(names))], med, width, yerr=err, capsize=3, label=label)
    ax.set_xticks(range(len(names)), [n + ("" if s[n]["ok_runs"] else "\n(no run finished)") for n in names])
    ax.set_ylabel("tokens / s (median, min..max)")
    ax.set_title(title.split(";")[0], fontsize=8)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
