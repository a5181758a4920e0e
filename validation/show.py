"""The tables ``specplan run`` and ``specplan validate`` print: predicted vs measured, signed errors, busy time."""

from __future__ import annotations

from pathlib import Path


def show_written(paths: list[Path]) -> None:
    for path in paths:
        print(f"wrote {path}")


def show_run(plan, r: dict) -> None:
    """The predicted-vs-measured tables of one run (``RunReport.report``), as ``specplan run`` prints them."""
    from rich.table import Table

    from specplan.fmt import console, human_bytes, human_seconds
    from specplan.validation.runs import tokens_label

    out = console()
    wl, m, p, err = r["workload"], r["measured"], r["predicted"], r["signed_error"]
    fmt = f"prompts: {r['prompt_format']}; " if "prompt_format" in r else ""
    out.print(f"[bold]ran {plan.model.name}[/bold]: {wl['num_prompts']} prompts ({r['prompts_distinct']} distinct) x "
              f"{tokens_label(wl)}, prompt length {wl['prompt_len_mean']:.1f} mean ({wl['prompt_len_min']}-"
              f"{wl['prompt_len_max']}; the plan assumed {wl['planned_prompt_len']}); {fmt}stop: {r['stop']}; "
              f"compute {r['compute_dtype']}; disk reads "
              + ("none" if r["o_direct"] is None else "O_DIRECT" if r["o_direct"] else "buffered + fadvise(DONTNEED)"))
    mode = r.get("benchmark_mode")
    if mode is not None:
        out.print(f"[bold red]{mode['note']}[/bold red]")
    if wl.get("generated_tokens_mean", wl["gen_len"]) < wl["gen_len"]:
        out.print(f"{r.get('stopped_at_eos', 0)} of {wl['num_prompts']} sequences stopped at EOS: the prediction "
                  f"assumes {wl['gen_len']} tokens each (fixed length), so it is not like for like; --fixed-length "
                  f"measures the benchmark workload")
    t = Table(title=f"predicted ({r['prediction_source']}) vs measured")
    for col in ("", "predicted", "measured", "(pred - meas) / meas"):
        t.add_column(col, justify="left" if not col else "right")

    def row(label: str, key: str, fmt) -> None:
        e = err.get(key)
        t.add_row(label, fmt(p[key]), fmt(m[key]), f"{e:+.1%}" if e is not None else "-")

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
    pb = p["busy_s"]
    for res in sorted(set(pb) | set(m["busy_s"])):
        e = err.get("busy_s", {}).get(res)
        frac = m["decode_busy_fraction"].get(res)
        u.add_row(res, human_seconds(pb[res]) if res in pb else "-", human_seconds(m["busy_s"].get(res, 0.0)),
                  f"{e:+.1%}" if e is not None else "-", f"{frac:.0%}" if frac is not None else "-")
    out.print(u)
    acc = r.get("acceptance")
    if acc is not None:
        measured = "-" if acc["measured"] is None else f"{acc['measured']:.3f}"
        frac = (f"{acc['accepted_tokens']} of {acc['proposed_tokens']} proposals accepted (accepted fraction "
                f"{acc['accepted_tokens'] / acc['proposed_tokens']:.3f})" if acc["proposed_tokens"] else "none proposed")
        out.print(f"draft acceptance: per-token a (maximum-likelihood estimate) assumed {acc['assumed']:.3f} "
                  f"({acc['assumed_model']}), measured {measured} over {acc['sequence_rounds']} sequence-rounds of "
                  f"{acc['draft_len']} proposals, {frac}")
        if acc["measured_curve"] is not None:
            out.print("P(n >= i), i = 1..g: assumed " + _curve(acc["assumed_curve"]) + "; measured "
                      + _curve(acc["measured_curve"]))
    show_errors(r)
    caps = r["capacity_bytes"]
    out.print("peak resident bytes (allocated): " + "; ".join(
        f"{tier} {human_bytes(v)}" + (f" of {human_bytes(caps[tier])}" if caps.get(tier) else "")
        for tier, v in r["peak_bytes"].items()))
    res = r["resident"]
    verdict = "within" if res["within_limit"] else "[bold red]ABOVE[/bold red]"
    out.print(f"process peak RSS {human_bytes(res['peak_rss_bytes'])}, {verdict} the plan's RAM bytes "
              f"{human_bytes(res['plan_ram_bytes'])} + process headroom {human_bytes(res['headroom_process_bytes'])} "
              f"= {human_bytes(res['limit_bytes'])} (headroom: {res['headroom_source']})")
    if "drift" in r:
        show_drift(r["drift"])


def drift_lines(d: dict) -> list[str]:
    """What ``specplan run`` says of a run's drift (``drift.drift_report``): one line per profile warning and per
    drifted figure, then the prediction at the observed rates next to the one at the profile."""
    from specplan.fmt import human_rate, human_seconds

    def value(row: dict) -> str:
        for unit, show in (("Bps", lambda v: human_rate(v, "B/s")), ("flop_per_s", lambda v: human_rate(v, "FLOP/s")),
                           ("s_each", human_seconds)):
            if f"observed_{unit}" in row:
                return f"{show(row[f'observed_{unit}'])}, the profile says {show(row[f'profile_{unit}'])}"
        raise KeyError(row["figure"])

    what = {"disk_read": "disk read", "h2d": "host->device copy", "device_compute": "device", "host_compute": "host",
            "overheads": "fixed overhead"}
    lines = [f"warning: {w}" for w in d["profile_warnings"]]
    rows = [row for row in d["figures"] if row["drifted"]]
    lines += [f"drift: {what.get(row['resource'], row['resource'])} {row['figure']}: the run measured {value(row)} "
              f"({row['ratio']:.2f}x, over {row['events']} events)" for row in rows]
    if not d["figures"]:
        lines.append("drift: not measured (no timed work in a decode phase to measure the profile's figures on)")
    elif not rows:
        lines.append(f"no drift: the {len(d['figures'])} figures the run measured are within "
                     f"{d['threshold']:.0%} of the profile's")
    p, o = d["predicted_at_profile"], d["predicted_at_observed_rates"]
    ep, eo = d["signed_error_at_profile"], d["signed_error_at_observed_rates"]

    def err(e) -> str:
        return "-" if e is None else f"{e:+.1%}"

    lines.append(f"predicted decode-only throughput at the observed rates {o['decode_tok_s']:.2f} tok/s "
                 f"({err(eo['decode_tok_s'])}), at the profile {p['decode_tok_s']:.2f} ({err(ep['decode_tok_s'])}); "
                 f"end to end {o['e2e_tok_s']:.2f} ({err(eo['e2e_tok_s'])}) and {p['e2e_tok_s']:.2f} "
                 f"({err(ep['e2e_tok_s'])})")
    both = d.get("predicted_at_observed_rates_and_measured_acceptance")
    if both is not None:
        e = d["signed_error_at_observed_rates_and_measured_acceptance"]
        lines.append(f"at the observed rates and the measured acceptance: {both['decode_tok_s']:.2f} tok/s "
                     f"decode-only ({err(e['decode_tok_s'])}), {both['e2e_tok_s']:.2f} end to end "
                     f"({err(e['e2e_tok_s'])})")
    return lines


def show_drift(d: dict) -> None:
    from specplan.fmt import console

    con = console()
    for line in drift_lines(d):
        con.print(line, highlight=False, markup=False)


def _curve(values: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in values)


def show_errors(r: dict) -> None:
    """The cost model's error (prediction at the measured acceptance) apart from the acceptance model's (expected
    vs measured tokens per round) and the routing's."""
    from specplan.fmt import console

    out = console()
    e = r.get("errors") or {}
    cost, acc, routing = e.get("cost_model"), e.get("acceptance_model"), e.get("routing")
    if cost is not None:
        se = cost["signed_error"]
        out.print(f"cost model's error (predicted at {cost['predicted_at']}): decode-only "
                  f"{cost['predicted_decode_tok_s']:.2f} predicted vs {cost['measured_decode_tok_s']:.2f} tok/s "
                  f"measured ({_pct(se['decode_tok_s'])}), end-to-end {cost['predicted_e2e_tok_s']:.2f} vs "
                  f"{cost['measured_e2e_tok_s']:.2f} ({_pct(se['e2e_tok_s'])})")
    if acc is not None:
        out.print(f"acceptance model's error ({acc['model']}): tokens per sequence and verification expected "
                  f"{acc['tokens_per_seq_round_expected']:.3f}, measured {acc['tokens_per_seq_round_measured']:.3f} "
                  f"({_pct(acc['signed_error'])})")
    if routing is not None:
        out.print(f"routing: distinct experts per MoE layer pass in decode expected "
                  f"{routing['distinct_experts_per_layer_pass_expected']:.2f} (uniform routing, "
                  f"{routing['routed_rows_mean']:.1f} routed rows mean), measured "
                  f"{routing['distinct_experts_per_layer_pass_measured']:.2f} ({_pct(routing['signed_error'])}) over "
                  f"{routing['layer_passes']} layer passes")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def show_grid(rows: list[dict], s: dict) -> None:
    """The validate grid's table (``grid.row``: medians of each plan's trials) and its summary (``grid.summarise``)."""
    from rich.table import Table

    from specplan.fmt import console

    t = Table(title="end-to-end throughput (tok/s): predicted, simulated, measured (median, min..max of the trials)")
    for col in ("plan", "GiB", "resident", "draft", "batches", "attn", "fetch", "predicted", "simulated", "measured",
                "pred err", "sim err", "decode pred err", "cost model err", "acceptance err"):
        t.add_column(col, justify="left" if col in ("draft", "fetch", "attn") else "right")
    for r in rows:
        t.add_row(f"{r['plan']}{' (chosen)' if r['chosen'] else ''}", f"{r['vram_gib']:g}",
                  f"{r['resident_fraction']:.0%}", f"{r['draft']}" + (f" g={r['draft_len']}" if r["draft_len"] else ""),
                  f"{r['num_batches']}x{r['decode_batch']}", r["attention_on"], r["expert_fetch"],
                  f"{r['predicted_e2e_tok_s']:.2f}", f"{r['simulated_e2e_tok_s']:.2f}",
                  f"{r['measured_e2e_tok_s']:.2f} ({r['measured_e2e_min_tok_s']:.2f}..{r['measured_e2e_max_tok_s']:.2f})",
                  f"{r['signed_error_predicted_e2e']:+.1%}", f"{r['signed_error_simulated_e2e']:+.1%}",
                  f"{r['signed_error_predicted_decode']:+.1%}", _pct(r.get("signed_error_cost_model_e2e")),
                  _pct(r.get("signed_error_acceptance_model")))
    con = console()
    con.print(t)
    for what, label in (("e2e", "end-to-end"), ("decode", "decode-only")):
        p, m = s[f"{what}_error_predicted"], s[f"{what}_error_simulated"]
        rho = s[f"spearman_predicted_vs_measured_{what}"]
        con.print(f"{label}: signed error of the prediction median {p['median']:+.1%} (median |error| "
                  f"{p['median_abs']:.1%}), worst {p['worst']:+.1%}; of the simulation median {m['median']:+.1%}, "
                  f"worst {m['worst']:+.1%}; rank correlation of predicted and measured (Spearman) "
                  f"{'-' if rho is None else f'{rho:.2f}'}")
    for budget, g in s["regret_e2e_by_budget"].items():
        con.print(f"at {budget} GiB: regret of the planner's choice (best measured / chosen measured, end-to-end) "
                  f"{g['regret']:.2f} (chose plan {g['chosen_plan']}, the fastest measured: plan "
                  f"{g['best_measured_plan']}, of {g['plans_at_budget']} plans there)")


def show_fit(rows: list[dict], s: dict) -> None:
    """A calibration fit (``calibrate.fit_grid``): the figures refitted, each plan's errors, the held-out summary."""
    from rich.table import Table

    from specplan.fmt import console

    con = console()
    fit = s["calibration"]
    con.print(f"fitted on plans {', '.join(map(str, s['fitted_on_plans']))} ({s['training_runs']} runs) of profile "
              f"{fit['base_profile']}: " + "; ".join(
                  [f"{k} x{v:.2f}" for k, v in fit["speed"].items()] + [f"{k} {v * 1e6:.0f} us"
                                                                       for k, v in fit["overhead_s"].items()]),
              highlight=False)
    t = Table(title="end-to-end throughput (tok/s): measured (median) vs predicted at the profile and calibrated")
    for col in ("plan", "split", "measured", "at profile", "err", "calibrated", "err", "calibrated at meas. acc.",
                "err"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for r in rows:
        k = "e2e_tok_s"
        at_acc = r.get(f"predicted_calibrated_at_measured_acceptance_{k}")
        t.add_row(str(r["plan"]), r["split"], f"{r[f'measured_{k}']:.2f}", f"{r[f'predicted_profile_{k}']:.2f}",
                  f"{r[f'signed_error_profile_{k}']:+.1%}", f"{r[f'predicted_calibrated_{k}']:.2f}",
                  f"{r[f'signed_error_calibrated_{k}']:+.1%}", "-" if at_acc is None else f"{at_acc:.2f}",
                  "-" if at_acc is None else f"{r[f'signed_error_calibrated_at_measured_acceptance_{k}']:+.1%}")
    con.print(t)
    h = s["held_out"]
    for label, what in (("profile", "at the profile as measured"), ("calibrated", "at the calibrated profile")):
        for key, name in (("e2e_tok_s", "end-to-end"), ("decode_tok_s", "decode-only")):
            e = h.get(f"{label}_{key}")
            if e is not None:
                rho = "-" if e["spearman"] is None else f"{e['spearman']:.2f}"
                con.print(f"held-out ({h['plans']} plans), {name}, {what}: median |error| {e['median_abs']:.1%}, "
                          f"worst {e['worst']:+.1%}, Spearman {rho}")
