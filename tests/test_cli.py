"""The `qwen-int4` CLI: chat driven through its prompt (pexpect), generate, tokenize."""
import json
import os
import subprocess
import sys

import pexpect
import pytest
import torch

from qwen_int4.cli.chat import ChatSession

CLI = [sys.executable, "-m", "qwen_int4.cli.main"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", TERM="dumb")
    return env


def _run(*args, check=True):
    res = subprocess.run(CLI + list(args), capture_output=True, text=True, env=_env(), timeout=300)
    if check:
        assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_int4_dir):
    from qwen_int4 import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_int4_dir).eval(), AutoTokenizer.from_pretrained(tiny_int4_dir)


def test_reply_is_streamed_in_pieces(model_and_tokenizer):
    model, tok = model_and_tokenizer
    pieces = []
    session = ChatSession(model, tok, "You are a helpful assistant.", 1234,
                          lambda text, end="\n": pieces.append(text + end))
    session.config = session.config.update(do_sample=False, max_new_tokens=12)
    reply = session.reply("你好")
    streamed = "".join(pieces)
    assert streamed == "Qwen: " + reply + "\n"
    assert len(pieces) > 3  # one piece per token that completed text, not one block at the end
    # the reference streams with errors='ignore' and skips special tokens: decode generate's ids so
    from qwen_int4.chat import make_context

    _, context = make_context(tok, "你好", system="You are a helpful assistant.")
    ids = model.generate(torch.tensor([context]), generation_config=session.config.update(seed=1234),
                         stop_words_ids=[[151645], [151644]])[0, len(context):].tolist()
    assert reply == tok.decode(ids, skip_special_tokens=True, errors="ignore")
    assert session.history == [("你好", reply)]


def test_chat_commands_through_prompt(tiny_int4_dir):
    child = pexpect.spawn(CLI[0], CLI[1:] + ["chat", "--model", str(tiny_int4_dir), "--max-new-tokens", "6"],
                          env=_env(), encoding="utf-8", timeout=120)
    child.expect("User: ")
    child.sendline("你好")
    child.expect("Qwen: ")
    child.expect("User: ")
    child.sendline(":his")
    child.expect(r"\[0\] User: 你好")
    child.expect("User: ")
    child.sendline(":seed")
    child.expect(r"\[seed: 1234\]")
    child.sendline(":seed 7")
    child.expect(r"\[seed: 7\]")
    child.sendline(":conf top_p=0.5 max_new_tokens=3")
    child.expect("generation config updated: top_p=0.5, max_new_tokens=3")
    child.sendline(":conf")
    child.expect("top_p = 0.5")
    child.sendline(":conf bogus=1")
    child.expect("bad :conf: unknown generation option")
    child.sendline(":reset-conf")
    child.expect("generation config reset")
    child.sendline(":clh")
    child.expect("history cleared")
    child.sendline(":his")
    child.expect("history is empty")
    child.sendline(":cl")
    child.sendline(":h")
    child.expect(":clear-his / :clh")
    child.sendline(":nope")
    child.expect("unknown command")
    child.sendline(":q")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_generate_greedy_is_deterministic_and_ids_match(tiny_int4_dir):
    args = ["generate", "--model", str(tiny_int4_dir), "--prompt", "你好", "--greedy", "--max-new-tokens", "8"]
    text1 = _run(*args).stdout
    assert text1 == _run(*args).stdout
    ids = json.loads(_run(*args, "--ids").stdout)
    assert 1 <= len(ids) <= 8 and all(isinstance(i, int) for i in ids)


def test_generate_empty_prompt_is_an_error(tiny_int4_dir):
    res = _run("generate", "--model", str(tiny_int4_dir), "--prompt", "  ", check=False)
    assert res.returncode == 2 and "prompt is empty" in res.stderr


def test_missing_model_dir_is_an_error(tmp_path):
    res = _run("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi", check=False)
    assert res.returncode == 2 and "error" in res.stderr


def test_tokenize():
    assert _run("tokenize", "你好").stdout.strip() == "[108386]"
    assert _run("tokenize", "--decode", "[108386]").stdout.strip() == "你好"


def test_readme_demo_chat_works_offline(tmp_path):
    """`qwen-int4 chat --demo` writes its tiny checkpoint once into the cache and chats."""
    env = dict(_env(), XDG_CACHE_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    for _ in range(2):  # the second start reuses the cached checkpoint
        child = pexpect.spawn(CLI[0], CLI[1:] + ["chat", "--demo", "--max-new-tokens", "4"],
                              env=env, encoding="utf-8", timeout=180)
        child.expect("User: ")
        child.sendline("hello")
        child.expect("Qwen: ")
        child.expect("User: ")
        child.sendline(":q")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    assert (tmp_path / "qwen-int4" / "demo-tiny-int4" / "config.json").exists()
