"""`hybridlm generate`: streams the same text the API generates, from --prompt, a file or stdin."""

from __future__ import annotations

import io

import pytest
import torch

from hybridlm.cli.main import main
from hybridlm.models import HybridLM

PROMPT = "Zürich — 日本"


@pytest.fixture
def checkpoint(tmp_path, make_config, byte_tokenizer):
    """A random byte-level hybrid (prone to emit bytes that form no valid UTF-8) with its tokenizer."""
    path = tmp_path / "checkpoint"
    torch.manual_seed(0)
    model = HybridLM(make_config(vocab_size=257, pad_token_id=0, eos_token_id=256))
    model.save_pretrained(path)
    tokenizer = byte_tokenizer
    tokenizer.save(str(path / "tokenizer.json"))
    return path, tokenizer


def _expected_text(path, tokenizer, new_tokens: int) -> str:
    model = HybridLM.from_pretrained(path).eval()
    ids = tokenizer.encode(PROMPT).ids
    generated = model.generate([ids], max_new_tokens=new_tokens)[0]
    return tokenizer.decode(generated, skip_special_tokens=True)


def test_prompt_streams_the_generated_text(checkpoint, capsys):
    path, tokenizer = checkpoint
    assert main(["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out == _expected_text(path, tokenizer, 20) + "\n"


def test_prompt_file_stdin_and_verbose_stats(checkpoint, capsys, monkeypatch, tmp_path):
    path, tokenizer = checkpoint
    expected = _expected_text(path, tokenizer, 8) + "\n"
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT, encoding="utf-8")
    assert main(["generate", str(path), "--prompt-file", str(prompt_file), "--max-new-tokens", "8", "--verbose"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected
    assert "cache" in captured.err and "MiB" in captured.err and "tokens/s" in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    assert main(["generate", str(path), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected


def test_cli_reports_bad_input(checkpoint, capsys, monkeypatch):
    path, _ = checkpoint
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["generate", str(path)]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", str(path), "--prompt", "x", "--max-new-tokens", "-3"]) == 2
    assert "max_new_tokens must be an integer >= 0" in capsys.readouterr().err
    assert main(["generate", str(path), "--prompt", "x" * 200, "--max-new-tokens", "1"]) == 2
    assert "max_seq_len=128" in capsys.readouterr().err
