"""``specplan models``: the catalog of model architectures, and the numbers the planner derives from one."""

from __future__ import annotations

import json

import click

from specplan.contracts.model import DTYPE_BYTES, WEIGHT_GROUPS
from specplan.contracts.tensors import PLAIN_DTYPES, param_bytes


@click.command("models")
@click.argument("name", required=False)
@click.option("--dtype", type=click.Choice(sorted(DTYPE_BYTES)), default=None, help="Weight dtype for byte counts [default: the checkpoint's].")
@click.option("--kv-dtype", type=click.Choice(sorted(PLAIN_DTYPES)), default=None, help="KV-cache dtype [default: the checkpoint's; float16 for a GGUF].")
@click.option("--context", "context_len", type=click.IntRange(min=0), default=4096, show_default=True, help="Context length for the attention FLOPs per token.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (numbers as numbers, units in key names).")
def command(name: str | None, dtype: str | None, kv_dtype: str | None, context_len: int, as_json: bool) -> None:
    """List the model catalog, or show one model (catalog NAME, config.json, HF folder or GGUF file).

    For one model: parameters (total, and active per token), bytes per tensor group at a dtype, KV-cache bytes per
    token, FLOPs per token.
    """
    from specplan.catalog import catalog_models, load_model_spec

    if name is None:
        specs = [load_model_spec(n) for n in catalog_models()]
        if as_json:
            click.echo(json.dumps([s.summary(dtype) for s in specs], indent=1))
            return
        _print_catalog(specs, dtype)
        return
    spec = load_model_spec(name)
    if as_json:
        click.echo(json.dumps(_details(spec, dtype, kv_dtype, context_len), indent=1))
        return
    _print_one(spec, dtype, kv_dtype, context_len)


def _details(spec, dtype: str | None, kv_dtype: str | None, context_len: int) -> dict:
    dtype = dtype or spec.dtype
    kv_dtype = kv_dtype or spec.kv_dtype
    return {
        "name": spec.name,
        "family": spec.family,
        "dtype": dtype,
        "total_params": spec.total_params,
        "active_params": spec.active_params,
        "params_by_group": spec.param_counts(),
        "bytes_by_group": spec.group_bytes(dtype),
        "bytes_per_param_by_group": {g: param_bytes(spec, g, dtype) for g in WEIGHT_GROUPS},
        "weight_bytes": spec.weight_bytes(dtype),
        "expert_bytes": spec.expert_bytes(dtype),
        "kv_dtype": kv_dtype,
        "kv_bytes_per_token": spec.kv_bytes_per_token(kv_dtype),
        "matmul_flops_per_token": spec.matmul_flops_per_token(),
        "context_len": context_len,
        "flops_per_token": spec.flops_per_token(context_len),
        "spec": spec.model_dump(mode="json"),
    }


def _print_catalog(specs, dtype: str | None) -> None:
    from rich.table import Table

    from specplan.fmt import console, human_bytes, human_count

    t = Table(title="specplan model catalog" + (f" (weights in {dtype})" if dtype else ""))
    for col in ("name", "family", "layers", "experts", "total", "active", "weights", "KV / token"):
        t.add_column(col, justify="left" if col in ("name", "family") else "right")
    for s in specs:
        experts = f"{s.experts_per_token}/{s.num_experts}" if s.is_moe else "-"
        t.add_row(
            s.name, s.family, str(s.num_layers), experts, human_count(s.total_params), human_count(s.active_params),
            human_bytes(s.weight_bytes(dtype)), human_bytes(s.kv_bytes_per_token(dtype)),
        )
    console().print(t)


def _print_one(spec, dtype: str | None, kv_dtype: str | None, context_len: int) -> None:
    from rich.table import Table

    from specplan.fmt import console, human_bytes, human_count

    d = _details(spec, dtype, kv_dtype, context_len)
    out = console()
    out.print(f"[bold]{spec.name}[/bold]  ({spec.family}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
                  f"{spec.num_heads} heads / {spec.num_kv_heads} KV heads of {spec.head_dim}"
                  + (f", {spec.num_experts} experts top-{spec.experts_per_token} in {len(spec.moe_layers)} layers" if spec.is_moe else "")
                  + ")")
    out.print(f"parameters: {human_count(d['total_params'])} total ({d['total_params']:,}), "
                  f"{human_count(d['active_params'])} active per token ({d['active_params']:,})")
    t = Table(title=f"tensor groups at {d['dtype']}")
    t.add_column("group")
    t.add_column("parameters", justify="right")
    t.add_column("bytes", justify="right")
    t.add_column("bits / parameter", justify="right")
    for g in WEIGHT_GROUPS:
        n = d["params_by_group"][g]
        if n:
            t.add_row(g, f"{n:,}", human_bytes(d["bytes_by_group"][g]),
                      f"{8 * d['bytes_per_param_by_group'][g]:.2f}")
    t.add_row("[bold]total[/bold]", f"{d['total_params']:,}", human_bytes(d["weight_bytes"]),
              f"{8 * d['weight_bytes'] / d['total_params']:.2f}")
    out.print(t)
    if spec.is_moe:
        out.print(f"one expert: {human_bytes(d['expert_bytes'])}")
    out.print(f"KV cache: {human_bytes(d['kv_bytes_per_token'])} per token ({d['kv_bytes_per_token']:,} bytes at {d['kv_dtype']})")
    out.print(f"FLOPs per token: {human_count(d['matmul_flops_per_token'])} in weight matmuls; "
                  f"{human_count(d['flops_per_token'])} at context {context_len}")
