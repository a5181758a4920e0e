"""Prompts in the chat template (``encode_prompts``), ``--raw``, and the stop rule of ``specplan run``: at EOS by
default, ``--fixed-length`` for the benchmark workload; outputs.jsonl says what was sent and where each sequence
stopped."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from runtime_fixtures import make_plan

from specplan.cli import main
from specplan.contracts.plan import Placement
from specplan.engine.model.checkpoint import open_checkpoint
from specplan.jsonio import write_json
from specplan.validation import runs
from specplan.validation.runs import FIXED_LENGTH, STOP_AT_EOS, encode_prompts, prompt_format

TEXTS = ["Hello there", "Explain in simple terms why the sky is blue."]


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    """The demo models' tokenizer: the SmolLM2 GGUF's, saved and loaded again as write_draft_from_gguf does."""
    from transformers import AutoTokenizer

    from specplan.engine.build.models import smollm2_gguf

    gguf = smollm2_gguf()
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_chat_template_ids_are_the_tokenizers_own(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.chat_template is not None and prompt_format(tok) == "chat template"
    ids = encode_prompts(tok, TEXTS)
    assert all(isinstance(p, list) and all(type(i) is int for i in p) for p in ids)
    raw = [tok(t)["input_ids"] for t in TEXTS]
    generation_prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for text, p, r in zip(TEXTS, ids, raw):
        msg = [{"role": "user", "content": text}]
        ref = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert p == list(ref)
        rendered = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        assert p == tok(rendered, add_special_tokens=False)["input_ids"]
        assert p != r and len(p) > len(r)
        assert p[-len(generation_prompt):] == generation_prompt  # the assistant's turn comes next
        assert tok.decode(p).endswith(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def test_raw_gives_the_raw_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert prompt_format(tok, raw=True) == "raw"
    assert encode_prompts(tok, TEXTS, raw=True) == [tok(t)["input_ids"] for t in TEXTS]


def test_the_demo_plans_assume_the_templated_length(smollm2_tokenizer, monkeypatch):
    from specplan.engine.model import checkpoint
    from specplan.validation.demo import longest_prompt

    class Folder:
        def tokenizer(self):
            return smollm2_tokenizer

    monkeypatch.setattr(checkpoint, "open_checkpoint", lambda folder: Folder())
    templated = max(len(p) for p in encode_prompts(smollm2_tokenizer, TEXTS))
    assert longest_prompt("demo", TEXTS) == templated > max(len(smollm2_tokenizer(t)["input_ids"]) for t in TEXTS)


def invoke(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


def printed(r) -> str:
    """What the command printed, the lines rich wrapped joined again."""
    return " ".join(r.output.split())


def rows_of(out):
    return [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model(tiny_model):
    folder = tiny_model("mixtral")
    return folder, open_checkpoint(folder).spec


def plan_for(folder, spec, tmp_path):
    plan = make_plan(spec, Placement.uniform(spec, "device"), path=str(folder), prompt_len=40, gen_len=5,
                     num_prompts=4, decode_batch=2, prefill_batch=2)
    return write_json(tmp_path / "plan.json", plan)


def test_run_uses_the_template_unless_raw(model, tmp_path):
    """The tiny byte-level tokenizer given a chat template: the run sends the templated bytes; --raw the text."""
    folder, spec = model
    chat = shutil.copytree(folder, tmp_path / "chat")
    tok = open_checkpoint(chat).tokenizer()
    assert prompt_format(tok) == "raw"  # the tiny tokenizer has no template: raw
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tok.save_pretrained(chat)
    plan = plan_for(chat, spec, tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n")
    args = ("--prompts", prompts, "--num-prompts", 1, "--max-new-tokens", 2)
    r = invoke(plan, *args, "-o", tmp_path / "chat_run")
    assert r.exit_code == 0, r.output
    sent = "<|user|>Hello there\n<|assistant|>\n"
    (row,) = rows_of(tmp_path / "chat_run")
    assert row["prompt"] == "Hello there" and row["prompt_sent"] == sent and row["prompt_tokens"] == len(sent)
    assert json.loads((tmp_path / "chat_run" / "result.json").read_text())["prompt_format"] == "chat template"
    assert "prompts: chat template" in printed(r)
    r = invoke(plan, *args, "--raw", "-o", tmp_path / "raw_run")
    assert r.exit_code == 0, r.output
    (row,) = rows_of(tmp_path / "raw_run")
    assert row["prompt_sent"] == "Hello there" and row["prompt_tokens"] == len("Hello there")
    assert json.loads((tmp_path / "raw_run" / "result.json").read_text())["prompt_format"] == "raw"


def test_eos_ends_a_sequence_by_default_and_fixed_length_ignores_it(model, tmp_path, monkeypatch):
    folder, spec = model
    plan = plan_for(folder, spec, tmp_path)
    r = invoke(plan, "--fixed-length", "-o", tmp_path / "fixed")
    assert r.exit_code == 0, r.output
    fixed = rows_of(tmp_path / "fixed")
    result = json.loads((tmp_path / "fixed" / "result.json").read_text())
    assert result["stop"] == FIXED_LENGTH and "stop: " + FIXED_LENGTH in printed(r)
    assert [row["generated_tokens"] for row in fixed] == [5] * 4 and all(len(row["token_ids"]) == 5 for row in fixed)
    assert not any(row["stopped_at_eos"] for row in fixed) and result["measured"]["generated_tokens"] == 20
    assert "4 prompts (4 distinct) x 5 tokens" in printed(r)

    # the random tiny model never says </s>: take a token it does say (the third of the first answer) for EOS
    eos = fixed[0]["token_ids"][2]
    monkeypatch.setattr(runs, "eos_ids", lambda ckpt, tok: [eos])
    expected = [row["token_ids"][: row["token_ids"].index(eos) + 1] if eos in row["token_ids"] else row["token_ids"]
                for row in fixed]
    r = invoke(plan, "-o", tmp_path / "eos")
    assert r.exit_code == 0, r.output
    rows = rows_of(tmp_path / "eos")
    result = json.loads((tmp_path / "eos" / "result.json").read_text())
    assert result["stop"] == STOP_AT_EOS and "stop: " + STOP_AT_EOS in printed(r)
    assert [row["token_ids"] for row in rows] == expected
    assert [row["stopped_at_eos"] for row in rows] == [eos in e for e in expected]
    assert rows[0]["stopped_at_eos"] and rows[0]["generated_tokens"] == 3
    assert [row["generated_tokens"] for row in rows] == [len(e) for e in expected]
    total = sum(len(e) for e in expected)
    m = result["measured"]
    assert m["generated_tokens"] == total < 20 and result["stopped_at_eos"] == sum(eos in e for e in expected)
    assert m["e2e_tok_s"] == pytest.approx(total / m["total_s"])
    assert m["decode_tokens"] == total - 4  # each sequence's first token comes from its prefill
    assert result["workload"]["generated_tokens_mean"] == pytest.approx(total / 4)
    assert f"4 prompts (4 distinct) x {total / 4:.1f} tokens mean (at most 5)" in printed(r)
    assert f"{result['stopped_at_eos']} of 4 sequences stopped at EOS: the prediction assumes 5 tokens" in printed(r)

    # --stop-at-eos: the deprecated spelling of the default
    r = invoke(plan, "--stop-at-eos", "-o", tmp_path / "alias")
    assert r.exit_code == 0, r.output
    assert [row["token_ids"] for row in rows_of(tmp_path / "alias")] == expected
    r = invoke(plan, "--stop-at-eos", "--fixed-length", "-o", tmp_path / "both")
    assert r.exit_code == 2 and "pass one" in r.output and not (tmp_path / "both").exists()
