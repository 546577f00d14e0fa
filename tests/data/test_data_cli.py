import argparse

import numpy as np

from hybridlm.cli import data as data_cli
from hybridlm.cli import main as cli_main
from hybridlm.cli import tokenizer as tokenizer_cli
from hybridlm.data import TokenDataset, Tokenizer
from hybridlm.data.prepare import DEFAULT_VAL_FRACTION


def run(argv: list[str]) -> int:
    """Parse with only the data commands registered (the full CLI loads every command module)."""
    parser = argparse.ArgumentParser(prog="hybridlm")
    subparsers = parser.add_subparsers(dest="command")
    data_cli.register(subparsers)
    tokenizer_cli.register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


def test_commands_are_registered():
    assert {"hybridlm.cli.data", "hybridlm.cli.tokenizer"} <= set(cli_main.COMMAND_MODULES)
    assert data_cli.DEFAULT_VAL_FRACTION == DEFAULT_VAL_FRACTION


def test_tokenizer_train_then_data_prepare(corpus, tmp_path, capsys):
    tokenizer_path = tmp_path / "tok" / "tokenizer.json"
    assert run(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tokenizer_path)]) == 0
    tokenizer = Tokenizer(tokenizer_path)
    assert tokenizer.eos_token_id == 0 and tokenizer.vocab_size <= 300
    out = tmp_path / "ds"
    assert run(["data", "prepare", str(corpus), "--tokenizer", str(tokenizer_path), "--out", str(out),
                "--workers", "2", "--val-fraction", "0.2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "val:" in printed
    dataset = TokenDataset(out)
    assert dataset.meta["val_fraction"] == 0.2
    first_doc = dataset.split("train").read(0, int(dataset.split("train").document_starts()[1]))
    assert first_doc[-1] == 0 and np.count_nonzero(first_doc == 0) == 1


def test_errors_are_reported_not_raised(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(["tokenizer", "train", str(empty), "--vocab-size", "300", "--out", str(tmp_path / "t.json")]) == 1
    assert "found no documents" in capsys.readouterr().err
    assert run(["data", "prepare", str(empty), "--tokenizer", str(tmp_path / "none.json"), "--out",
                str(tmp_path / "ds"), "--no-progress"]) == 1
    assert "hybridlm tokenizer train" in capsys.readouterr().err
