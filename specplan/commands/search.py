"""``specplan search``: the fastest plan to run a model on this machine (or a profiled one), and why."""

from __future__ import annotations

import shlex
import time

import click

from specplan.commands._params import GIB
from specplan.fmt import GiB
DEFAULT_PROMPT_LEN, DEFAULT_GEN_LEN, DEFAULT_NUM_PROMPTS = 512, 128, 256


@click.command("search")
@click.option("--model", required=True, help="Catalog name (see `specplan models`), config.json or HF model folder.")
@click.option("--vram", type=GIB, required=True,
              help="Device memory budget in GiB (2^30 bytes). Without a GPU: the RAM budget for resident weights, "
                   "KV cache and buffers; the rest streams from disk.")
@click.option("--ram", type=GIB, default=None,
              help="Host memory budget in GiB [default: the profile's host memory]. Without a GPU there is no separate "
                   "host tier: --vram is the budget.")
@click.option("--disk", type=GIB, default=None,
              help="Disk budget for offloaded weights in GiB [default: unlimited].")
@click.option("--profile", "profile_arg", default=None,
              help="Hardware profile: bundled name or file [default: this machine's newest measured profile].")
@click.option("--draft", "drafts", multiple=True,
              help="Draft to consider (repeatable): none, substitute:int8, substitute:int4, or a catalog name / "
                   "model folder sharing the target's vocabulary [default: none, both substitutes, and catalog "
                   "drafts that match].")
@click.option("--acceptance", type=click.FloatRange(0, 1), default=None,
              help="Per-token acceptance of the draft(s), measured elsewhere [default: --calibration, else a "
                   "documented prior, printed as an assumption].")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="JSON file of measured acceptance per draft (specplan.contracts.calibration).")
@click.option("--prompt-len", type=click.IntRange(min=1), default=DEFAULT_PROMPT_LEN, show_default=True,
              help="Tokens per prompt.")
@click.option("--gen-len", type=click.IntRange(min=1), default=DEFAULT_GEN_LEN, show_default=True,
              help="New tokens per prompt.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=DEFAULT_NUM_PROMPTS, show_default=True,
              help="Prompts in the workload.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the best plan here.")
@click.option("--top", type=click.IntRange(min=1, max=50), default=5, show_default=True, help="Plans to list.")
@click.option("--explain", is_flag=True, help="Say why the best plan wins and what more memory or a faster "
                                                "resource would buy (re-runs the search a few times).")
def command(model, vram, ram, disk, profile_arg, drafts, acceptance, calibration, prompt_len, gen_len, num_prompts,
            output, top, explain) -> None:
    """Search batch sizes, speculative drafts and tensor placement for the highest end-to-end throughput.

    Every combination of the discrete knobs gets an LP that places tensor groups over device / host / disk
    under the memory budgets; the best plans are rounded to whole tensors and predicted from the same per-op
    costs the simulator uses. Prints the best plans (end-to-end throughput includes prefill; decode-only does
    not) and writes the best with -o.
    """
    from specplan.jsonio import write_json
    from specplan.planner.search import search

    t0 = time.perf_counter()
    ask = make_ask(model, vram, ram, disk, profile_arg, drafts, acceptance, calibration, prompt_len, gen_len,
                   num_prompts, top, _command_line())
    result = search(ask)
    elapsed = time.perf_counter() - t0
    _print(ask, result, elapsed)
    best = result.plans[0]
    if explain:
        from specplan.planner.explain import explain as why

        click.echo("\nWhy this plan:")
        for line in why(ask, best):
            click.echo(f"  - {line}")
    if output:
        write_json(output, best)
        click.echo(f"wrote {output}")


def make_ask(model: str, vram: float, ram: float | None, disk: float | None, profile_arg: str | None,
             drafts: tuple[str, ...], acceptance: float | None, calibration: str | None, prompt_len: int,
             gen_len: int, num_prompts: int, top: int, command: str | None = None):
    """The planner's ``Ask`` from the options of ``specplan search`` (``specplan validate`` takes the same)."""
    from specplan.catalog import load_model_spec, load_profile, model_config_path
    from specplan.contracts.calibration import Calibration
    from specplan.contracts.plan import Capacities, Workload
    from specplan.errors import SpecplanError
    from specplan.jsonio import load
    from specplan.planner.drafts import choices
    from specplan.planner.search import Ask

    spec = load_model_spec(model)
    profile = load_profile(profile_arg)
    cfg = model_config_path(model)
    local = str(cfg.parent) if cfg.name == "config.json" and any(cfg.parent.glob("*.safetensors")) else None
    if profile.shared_memory:
        if vram * GiB > profile.host.memory_bytes:
            raise SpecplanError(f"--vram {vram:g} GiB exceeds this machine's memory "
                                f"({profile.host.memory_bytes / GiB:.1f} GiB): device and host share it here")
        caps = Capacities(device_bytes=int(vram * GiB), disk_bytes=int(disk * GiB) if disk else None)
    else:
        caps = Capacities(device_bytes=int(vram * GiB), host_bytes=int((ram or profile.host.memory_bytes / GiB) * GiB),
                          disk_bytes=int(disk * GiB) if disk else None)
    calib = load(Calibration, calibration) if calibration else None
    draft_choices = choices(list(drafts) or None, spec, spec.name, acceptance, calib)
    workload = Workload(prompt_len=prompt_len, gen_len=gen_len, num_prompts=num_prompts)
    return Ask(spec=spec, model_name=spec.name, profile=profile, capacities=caps, workload=workload,
               drafts=tuple(draft_choices), top=top, model_path=local, command=command)


def _command_line() -> str:
    """The invocation, rebuilt from the parsed options (so that it is right however the command was called)."""
    ctx = click.get_current_context()
    parts = ["specplan", "search"]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if value in (None, False, ()) or value == p.default:
            continue
        flag = max(p.opts, key=len)
        if p.is_flag:
            parts.append(flag)
        else:
            for v in value if isinstance(value, tuple) else (value,):
                parts += [flag, shlex.quote(f"{v:g}" if isinstance(v, float) else str(v))]
    return " ".join(parts)


def _placement_summary(plan) -> str:
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


def _where(plan) -> str:
    pol, pl = plan.policy, plan.placement
    out = []
    if plan.model.spec.is_moe and any(t != "device" for lp in pl.layers for t in lp.experts):
        out.append(f"experts run on {pol.experts_on}, fetch {pol.expert_fetch}")
    if any(lp.kv_cache == "host" for lp in pl.layers):
        out.append(f"attention on {pol.attention_on}")
    return ", ".join(out)


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """A plain aligned text table (quick to print, readable in a pipe or a log)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _print(ask, result, elapsed: float) -> None:
    prof, cap, wl = ask.profile, ask.capacities, ask.workload
    host = f"{cap.capacity_bytes('host', prof) / GiB:.2f} GiB" if prof.has_host_tier else "shared with the device"
    best = result.plans[0]
    out = [f"{ask.model_name} on {prof.name} ({prof.provenance.kind} profile): device {cap.device_bytes / GiB:.2f} GiB, "
           f"host {host}, disk {'unlimited' if cap.disk_bytes is None else f'{cap.disk_bytes / GiB:.2f} GiB'}; "
           f"weights in {best.policy.weight_dtype}",
           f"workload: {wl.num_prompts} prompts x {wl.prompt_len} tokens in, {wl.gen_len} tokens out", ""]
    rows = []
    for i, plan in enumerate(result.plans, 1):
        p, pol = plan.prediction, plan.policy
        draft = "none" if not pol.speculative else f"{plan.draft.label} g={pol.draft_len} a={pol.acceptance:g}"
        where = _where(plan)
        rows.append([str(i), f"{p.e2e_tok_s:.2f}", f"{p.decode_tok_s:.2f}",
                     f"{pol.num_batches}x{pol.decode_batch} / {pol.prefill_batch}", draft,
                     _placement_summary(plan) + (f" ({where})" if where else ""), p.bottleneck,
                     "/".join(f"{p.peak_bytes.get(t, 0) / GiB:.1f}" for t in ("device", "host", "disk"))])
    out += _table(["#", "e2e tok/s", "decode tok/s", "batch / prefill", "draft", "placement (D device, H host, K disk)",
                   "binds", "peak GiB dev/host/disk"], rows, right={0, 1, 2, 7})
    p = best.prediction
    out += ["", "e2e = end-to-end, prefill included; decode = decode rounds only",
            f"best: {p.e2e_tok_s:.2f} tok/s end-to-end, {p.decode_tok_s:.2f} tok/s decode-only; prefill "
            f"{p.prefill_s:.1f} s + decode {p.decode_s:.1f} s; first token after {p.ttft_s:.2f} s"]
    out += [f"assumes {note}" for note in p.assumptions]
    out += [f"note: {note}" for note in result.notes]
    out.append(f"searched {result.candidates} candidates ({result.lps} LPs, {result.milps} whole-unit placements, "
               f"{result.pruned} pruned) in {elapsed:.2f} s")
    click.echo("\n".join(out))
