"""A contender of ``bench/peers.py`` in its own process: transformers + accelerate offloading (``device_map="auto"``,
``max_memory``, ``offload_folder``), greedy, a fixed number of new tokens (EOS ends no sequence: the generation
config's EOS is unset, so an EOS is one more token, as in ``specplan run --fixed-length``), and with
``--assistant`` transformers' assisted generation (``assistant_model``; one sequence at a time, as transformers
runs it).

    python bench/peers_hf.py --model DIR --ids prompts.json --tokens N --dtype float32|bfloat16
                             --max-memory-bytes B --offload-folder DIR [--batch B] [--assistant DIR] -o result.json

``--ids``: the prompts' token ids (a JSON list of lists, the chat template applied by the caller, the same ids every
contender gets). Writes the times it can tell apart (load, time to first token, decode-only: from each batch's first
new token to its last), the generated token ids and its own peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList  # noqa: E402


class Clock(StoppingCriteria):
    """Never stops; records when each generation step ends and how long the sequences are then."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.steps.append((time.perf_counter(), input_ids.shape[1]))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def load(path: str, dtype: torch.dtype, max_memory_bytes: int, offload_folder: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto",
                                                max_memory={"cpu": max_memory_bytes}, offload_folder=offload_folder)


def batches(ids: list[list[int]], size: int):
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), required=True)
    ap.add_argument("--max-memory-bytes", type=int, required=True)
    ap.add_argument("--offload-folder", required=True)
    ap.add_argument("--batch", type=int, default=0, help="sequences per generate call [default: all]")
    ap.add_argument("--assistant", default=None)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()

    prompts = json.loads(Path(args.ids).read_text())
    dtype = getattr(torch, args.dtype)
    t_load = time.perf_counter()
    model = load(args.model, dtype, args.max_memory_bytes, args.offload_folder)
    assistant = (AutoModelForCausalLM.from_pretrained(args.assistant, dtype=dtype) if args.assistant else None)
    load_s = time.perf_counter() - t_load
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    for m in (model, assistant):
        if m is not None:
            m.generation_config.eos_token_id = None  # fixed length: EOS is a token like any other
    size = 1 if assistant is not None else (args.batch or len(prompts))

    generated, ttft_s, decode_s, decode_tokens = [], None, 0.0, 0
    t_gen = time.perf_counter()
    with torch.inference_mode():
        for rows in batches(prompts, size):
            ids, mask = left_padded(rows, pad)
            clock = Clock()
            t_call = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.tokens,
                                 do_sample=False, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([clock]),
                                 **({"assistant_model": assistant} if assistant is not None else {}))
            new = out[:, ids.shape[1]:ids.shape[1] + args.tokens]
            generated += new.tolist()
            (t_first, n_first), (t_last, _) = clock.steps[0], clock.steps[-1]
            if ttft_s is None:
                ttft_s = t_first - t_call
            decode_s += t_last - t_first
            decode_tokens += len(rows) * (args.tokens - (n_first - ids.shape[1]))
    gen_s = time.perf_counter() - t_gen
    tokens = sum(map(len, generated))
    result = {"contender": "transformers assisted" if assistant is not None else "transformers + accelerate",
              "dtype": args.dtype, "batch": size, "max_memory_bytes": args.max_memory_bytes,
              "device_map": sorted({str(v) for v in getattr(model, "hf_device_map", {}).values()}),
              "startup_s": t_load - T0, "load_s": load_s, "gen_s": gen_s, "ttft_s": ttft_s,
              "decode_s": decode_s, "decode_tokens": decode_tokens, "generated_tokens": tokens,
              "gen_tok_s": tokens / gen_s, "decode_tok_s": decode_tokens / decode_s if decode_s > 0 else None,
              "peak_rss_bytes": vm_hwm_bytes(), "token_ids": generated, "pid": os.getpid()}
    tmp = Path(args.output).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
