"""The text ``specplan search`` prints: the best plans as an aligned table, the best one's figures and notes."""

from __future__ import annotations

from specplan.fmt import GiB


def placement_summary(plan) -> str:
    """Units per tier, e.g. 'experts 1D/90H/357K; kv H' (D device, H host, K disk); resident groups omitted."""
    counts: dict[str, dict[str, int]] = {}
    pl = plan.placement

    def add(group: str, tier: str | None) -> None:
        if tier is not None:
            row = counts.setdefault(group, {})
            row[tier] = row.get(tier, 0) + 1

    for lp in pl.layers:
        add("attn", lp.attention)
        add("kv", lp.kv_cache)
        add("mlp", lp.mlp)
        add("shared", lp.shared_experts)
        for t in lp.experts:
            add("experts", t)
    add("embed", pl.embed)
    add("head", pl.lm_head)
    if plan.draft.kind == "model":
        add("draft", pl.draft_weights)
    short = {"device": "D", "host": "H", "disk": "K"}
    parts = []
    for group, row in counts.items():
        if set(row) == {"device"}:
            continue
        if len(row) == 1:
            parts.append(f"{group} {short[next(iter(row))]}")
        else:
            parts.append(f"{group} " + "/".join(f"{row[t]}{short[t]}" for t in ("device", "host", "disk") if t in row))
    return "; ".join(parts) or "all resident"


def where_run(plan) -> str:
    pol, pl = plan.policy, plan.placement
    out = []
    if plan.model.spec.is_moe and any(t != "device" for lp in pl.layers for t in lp.experts):
        out.append(f"experts run on {pol.experts_on}, fetch {pol.expert_fetch}")
    if any(lp.kv_cache == "host" for lp in pl.layers):
        out.append(f"attention on {pol.attention_on}")
    return ", ".join(out)


def text_table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """A plain aligned text table (quick to print, readable in a pipe or a log)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def headroom_lines(ask) -> list[str]:
    """The host RAM reserved outside the budgets, and a warning where --ram leaves less than that."""
    head, prof = ask.capacities.headroom, ask.profile
    if head is None:
        return []
    mem = prof.host.memory_bytes
    line = (f"headroom: {head.total_bytes / GiB:.2f} GiB of the {mem / GiB:.2f} GiB of RAM kept out of the plan: "
            f"{head.process_bytes / GiB:.2f} GiB for the engine process ({head.source}) + "
            f"{head.os_bytes / GiB:.2f} GiB for the OS")
    used = ask.capacities.capacity_bytes("host", prof) if prof.has_host_tier else ask.capacities.device_bytes
    if used + head.total_bytes > mem:
        line += (f"; warning: the budgets leave only {max(mem - used, 0) / GiB:.2f} GiB of RAM for them, the run may "
                 f"swap or be killed")
    return [line]


def search_lines(ask, result, elapsed_s: float) -> list[str]:
    """What ``specplan search`` prints: the ask, the best plans as a table, the best one's figures, notes."""
    prof, cap, wl = ask.profile, ask.capacities, ask.workload
    host = f"{cap.capacity_bytes('host', prof) / GiB:.2f} GiB" if prof.has_host_tier else "shared with the device"
    best = result.plans[0]
    out = [f"{ask.model_name} on {prof.name} ({prof.provenance.kind} profile): device {cap.device_bytes / GiB:.2f} GiB, "
           f"host {host}, disk {'unlimited' if cap.disk_bytes is None else f'{cap.disk_bytes / GiB:.2f} GiB'}; "
           f"weights in {best.policy.weight_dtype}",
           *headroom_lines(ask),
           f"workload: {wl.num_prompts} prompts x {wl.prompt_len} tokens in, {wl.gen_len} tokens out", ""]
    rows = []
    for i, plan in enumerate(result.plans, 1):
        p, pol = plan.prediction, plan.policy
        draft = "none" if not pol.speculative else f"{plan.draft.label} g={pol.draft_len} a={pol.acceptance:g}"
        where = where_run(plan)
        rows.append([str(i), f"{p.e2e_tok_s:.2f}", f"{p.decode_tok_s:.2f}",
                     f"{pol.num_batches}x{pol.decode_batch} / {pol.prefill_batch}", draft,
                     placement_summary(plan) + (f" ({where})" if where else ""), p.bottleneck,
                     "/".join(f"{p.peak_bytes.get(t, 0) / GiB:.1f}" for t in ("device", "host", "disk"))])
    out += text_table(["#", "e2e tok/s", "decode tok/s", "batch / prefill", "draft", "placement (D device, H host, K disk)",
                   "binds", "peak GiB dev/host/disk"], rows, right={0, 1, 2, 7})
    p = best.prediction
    out += ["", "e2e = end-to-end, prefill included; decode = decode rounds only",
            f"best: {p.e2e_tok_s:.2f} tok/s end-to-end, {p.decode_tok_s:.2f} tok/s decode-only; prefill "
            f"{p.prefill_s:.1f} s + decode {p.decode_s:.1f} s; first token after {p.ttft_s:.2f} s"]
    out += [f"assumes {note}" for note in p.assumptions]
    out += [f"note: {note}" for note in result.notes]
    out.append(f"searched {result.candidates} candidates ({result.lps} LPs, {result.milps} whole-unit placements, "
               f"{result.pruned} pruned) in {elapsed_s:.2f} s")
    return out
