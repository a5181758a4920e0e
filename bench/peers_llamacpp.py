"""llama.cpp as a contender of ``bench/peers.py``: the set-up (built once, the model converted once) and one run.

    python bench/peers_llamacpp.py setup --sdist llama_cpp_python-0.3.16.tar.gz --cache DIR [--model HF_DIR ...]
                                     [--outtype f32|bf16]
    python bench/peers_llamacpp.py run --bin DIR --gguf FILE --ids prompts.json --tokens N -o result.json
                                   [--draft DRAFT.gguf [--draft-max N]]

Set-up: llama.cpp as vendored in the llama-cpp-python sdist from PyPI, built with cmake (``llama-server``) into
``DIR/build`` and each model converted by llama.cpp's own ``convert_hf_to_gguf.py`` to ``DIR/gguf/<model>-<outtype>.gguf``;
both skipped when there (one line of the vendored converter's tensor mapping is dropped first: ``DUPLICATE``). The
converter needs ``sentencepiece`` and ``mistral_common`` in the running Python.

Run: ``llama-server`` (its default mmap loading, one parallel slot per prompt, 2 threads) on a local port; every
prompt's token ids go in at once as ``/completion`` requests, greedy (``temperature`` 0, ``top_k`` 1), ``n_predict``
N with ``ignore_eos``. Writes the same keys as ``peers_hf.py``: start + load (to the server's health), generation
(the requests' wall time), decode-only from llama.cpp's own timings (the tokens over the longest slot's
``predicted_ms``), time to first token (none: the requests do not stream), the server's VmHWM and the token ids.
With ``--draft``: llama.cpp's own draft-model speculative decoding (``-md``; its defaults: up to 16 tokens drafted,
a draft stopped where the draft's top probability falls below 0.75), slot by slot, and the drafted and accepted
token counts from its timings. Its speculative path counts a whole accepted block as generated and stops sending
mid-block at ``n_predict``, so a sequence can come back a few tokens short while its own count says ``n_predict``:
``generated_tokens`` is what came back, ``decode_tokens`` llama.cpp's count.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from specplan.errors import SpecplanError

T0 = time.perf_counter()
VENDORED = "vendor/llama.cpp/"
#: in the vendored converter (llama-cpp-python 0.3.16) this name also maps to FFN_GATE (for SmallThinker) after its
#: FFN_GATE_INP entry, so a Mixtral router is written as ``ffn_gate`` and llama.cpp refuses the file ("missing tensor
#: blk.0.ffn_gate_inp.weight"); the set-up drops that second entry
#: the llama-cpp-python release whose vendored llama.cpp is built, and what its converter imports
SDIST_VERSION = "0.3.16"
CONVERTER_NEEDS = ("sentencepiece", "mistral_common")
OUTTYPES = ("f32", "bf16")
DTYPES = {"f32": "float32", "bf16": "bfloat16"}
DUPLICATE = '            "model.layers.{bid}.block_sparse_moe.gate",   # smallthinker\n'


def setup(sdist: Path, cache: Path, models: list[tuple[Path, str]], log=print) -> tuple[Path, list[Path]]:
    """(the folder of the built binaries, the GGUF of each (HF folder, outtype) of ``models``), building and
    converting only what is missing."""
    src, build = cache / "src", cache / "build"
    if not (src / "convert_hf_to_gguf.py").exists():
        if not sdist.is_file():  # from the package registry, once
            step([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d",
                  str(sdist.parent), f"llama-cpp-python=={SDIST_VERSION}"], "downloading the llama-cpp-python sdist")
        if not sdist.is_file():
            raise SpecplanError(f"{sdist}: no llama-cpp-python sdist there and no llama.cpp in {src}; download it "
                                f"with `pip download --no-binary :all: --no-deps llama-cpp-python=={SDIST_VERSION}`, "
                                f"or leave llamacpp-bf16 out of --contenders")
        with tarfile.open(sdist) as tar:
            root = tar.getnames()[0].split("/")[0] + "/"
            members = [m for m in tar.getmembers() if m.name.startswith(root + VENDORED)]
            for m in members:
                m.name = m.name[len(root + VENDORED):]
            tar.extractall(src, members=[m for m in members if m.name], filter="data")
    mapping = src / "gguf-py" / "gguf" / "tensor_mapping.py"
    text = mapping.read_text()
    if DUPLICATE in text:
        mapping.write_text(text.replace(DUPLICATE, "", 1))
    server = build / "bin" / "llama-server"
    if not server.exists():
        t = time.perf_counter()
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        step(["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"], "configuring llama.cpp")
        step(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1), "--target", "llama-server"],
             "building llama-server")
        log(f"built llama.cpp in {time.perf_counter() - t:.0f} s")
    return server.parent, [converted(src, cache, m, outtype) for m, outtype in models]


def converted(src: Path, cache: Path, model: Path, outtype: str) -> Path:
    """``model`` (an HF folder) as a GGUF of ``outtype`` (``f32``, ``bf16``) by llama.cpp's own converter in
    ``src``, converted once."""
    gguf = cache / "gguf" / f"{model.name}-{outtype}.gguf"
    if not gguf.exists():
        missing = [m for m in CONVERTER_NEEDS if importlib.util.find_spec(m) is None]
        if missing:  # llama.cpp's converter imports them; from the package registry, once
            step([sys.executable, "-m", "pip", "install", "-q", *(m.replace("_", "-") for m in missing)],
                 f"installing what llama.cpp's converter needs ({', '.join(missing)})")
        gguf.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_suffix(".tmp")
        step([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outfile", str(tmp), "--outtype",
              outtype], "converting the model to GGUF (it needs sentencepiece and mistral_common)",
             {**os.environ, "PYTHONPATH": str(src / "gguf-py")})
        os.replace(tmp, gguf)
    return gguf


def outtype_of(gguf: Path) -> str:
    """The outtype in the name ``converted`` gives a GGUF."""
    outtype = gguf.stem.rsplit("-", 1)[-1]
    if outtype not in OUTTYPES:
        raise SpecplanError(f"{gguf}: not a GGUF this set-up converted (<model>-<{'|'.join(OUTTYPES)}>.gguf)")
    return outtype


def step(cmd: list[str], what: str, env: dict | None = None) -> None:
    """A set-up command; a SpecplanError in one line if it fails (its output is above)."""
    if subprocess.run(cmd, env=env).returncode != 0:
        raise SpecplanError(f"llama.cpp set-up: {what} failed (`{' '.join(cmd[:3])} ...`, its output above)")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def vm_hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(bin_dir: Path, gguf: Path, prompts: list[list[int]], tokens: int, port: int, draft: Path | None = None,
        draft_max: int | None = None) -> dict:
    """One run of the server on ``prompts``; with ``draft``: llama.cpp's own draft-model speculative decoding (its
    defaults but ``draft_max``; the server drafts only for requests that may cache their prompt)."""
    ctx = max(map(len, prompts)) + tokens + 8
    speculative = [] if draft is None else ["-md", str(draft), "--threads-draft", "2",
                                            *(("--draft-max", str(draft_max)) if draft_max else ())]
    server = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(gguf), "--port", str(port), "--parallel",
                               str(len(prompts)), "-c", str(ctx * len(prompts)), "--threads", "2", "--no-webui",
                               *speculative], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t_load = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"llama-server exited with {server.returncode} while loading")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        load_s = time.perf_counter() - t_load
        body = lambda p: {"prompt": p, "n_predict": tokens, "ignore_eos": True, "temperature": 0.0,  # noqa: E731
                          "top_k": 1, "cache_prompt": draft is not None, "return_tokens": True}
        t_gen = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda p: post(f"http://127.0.0.1:{port}/completion", body(p)), prompts))
        gen_s = time.perf_counter() - t_gen
        peak = vm_hwm_bytes(server.pid)
    finally:
        server.kill()
        server.wait()
    ids = [a["tokens"] for a in answers]
    n = sum(a["timings"]["predicted_n"] for a in answers)
    longest_ms = max(a["timings"]["predicted_ms"] for a in answers)
    total = sum(map(len, ids))
    return {"contender": "llama.cpp server", "dtype": DTYPES[outtype_of(gguf)], "batch": len(prompts), "startup_s": t_load - T0,
            "load_s": load_s, "gen_s": gen_s, "ttft_s": None, "decode_tokens": n,
            "decode_tok_s": n / (longest_ms / 1000) if longest_ms > 0 else None, "generated_tokens": total,
            "gen_tok_s": total / gen_s, "peak_rss_bytes": peak, "token_ids": ids,
            "draft_tokens": sum(a["timings"].get("draft_n", 0) for a in answers),
            "draft_accepted_tokens": sum(a["timings"].get("draft_n_accepted", 0) for a in answers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--sdist", required=True)
    s.add_argument("--cache", required=True)
    s.add_argument("--model", nargs="*", default=[], help="HF folders to convert to GGUF")
    s.add_argument("--outtype", default="bf16", choices=OUTTYPES)
    r = sub.add_parser("run")
    r.add_argument("--bin", required=True)
    r.add_argument("--gguf", required=True)
    r.add_argument("--ids", required=True)
    r.add_argument("--tokens", type=int, required=True)
    r.add_argument("--port", type=int, default=18080)
    r.add_argument("--draft", default=None, help="a draft GGUF: llama.cpp's draft-model speculative decoding")
    r.add_argument("--draft-max", type=int, default=None)
    r.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    if args.step == "setup":
        bin_dir, ggufs = setup(Path(args.sdist), Path(args.cache), [(Path(m), args.outtype) for m in args.model])
        print(bin_dir, *ggufs)
        return
    result = run(Path(args.bin), Path(args.gguf), json.loads(Path(args.ids).read_text()), args.tokens, args.port,
                 Path(args.draft) if args.draft else None, args.draft_max)
    tmp = Path(args.output).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
