"""`hybridlm theory verify` and `verify_constructions`: the table, the exit codes, bad knobs."""

import pytest
import torch

from hybridlm.cli.main import main
from hybridlm.theory import CONSTRUCTIONS, verify_constructions
from hybridlm.theory.verify import check_sizes, format_table


def test_verify_prints_a_table_and_exits_0_when_all_exact(capsys):
    assert main(["theory", "verify", "--n", "12", "--m", "9", "--k", "3", "--instances", "2", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "construction  layers" in out and "all answers exact" in out
    for name, layout in (("parity", "G"), ("tracking", "GG"), ("bit_recall", "GA"), ("state_recall", "GGA")):
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert f" {layout} " in row and "2/2" in row and "1/1" in row
    assert "n=12 m=9 k=3" in out and "length=12" in out
    assert "# state_recall: n=12 m=9 k=3, 2 instances" in captured.err


def test_verify_float64_subset_without_decode(capsys):
    assert main(["theory", "verify", "--n", "5", "--m", "6", "--dtype", "float64", "--decode-instances", "0",
                 "--only", "parity,bit_recall", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    out = capsys.readouterr().out
    assert "bit_recall" in out and "tracking" not in out and "0/0" in out


def test_verify_exits_1_when_an_answer_is_wrong(capsys, monkeypatch):
    construction = CONSTRUCTIONS["parity"]

    def broken(task, dtype):
        model = construction.build(task, dtype=dtype)
        model.lm_head.weight.data[task.vocab.id("0")] *= 3.0  # "0" now beats "1" on odd prefixes
        return model

    monkeypatch.setitem(CONSTRUCTIONS, "parity", construction.__class__(**{**construction.__dict__, "build": broken}))
    assert main(["theory", "verify", "--n", "20", "--m", "5", "--only", "parity"]) == 1
    assert "NOT all answers exact" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["--n", "-1", "--m", "10"], "valid n (swap lines, and parity bits) is 1..65536"),
    (["--n", "10", "--m", "3"], "each of the k=5 pointers needs its own index, so valid m is 5..16384"),
    (["--n", "10", "--m", "20000"], "valid m is 5..16384"),
    (["--n", "10", "--m", "10", "--k", "27"], "valid k is 2..26"),
    (["--n", "10", "--m", "10", "--instances", "0"], "need at least 1"),
    (["--n", "10", "--m", "10", "--decode-instances", "-2"], "decode_instances must be an integer >= 0"),
    (["--n", "10", "--m", "10", "--only", "parity,bogus"], "valid names: ['parity', 'tracking'"),
    (["--n", "10", "--m", "10", "--threads", "0"], "--threads must be >= 1"),
])
def test_bad_knobs_exit_2_with_the_valid_range(capsys, arguments, message):
    assert main(["theory", "verify", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_check_sizes_lists_every_problem_and_rejects_non_integers():
    with pytest.raises(ValueError) as error:
        check_sizes(-1, 2, 5, 1)
    assert "valid n" in str(error.value) and "valid m is 5..16384" in str(error.value)
    with pytest.raises(ValueError, match="n must be an integer"):
        check_sizes(2.5, 10, 5, 1)


def test_verify_constructions_api_and_table():
    results = verify_constructions(3, 5, k=2, instances=1, names=["tracking"], decode_instances=1)
    (result,) = results
    assert result.passed and result.layers == "GG" and result.tokens == len(
        CONSTRUCTIONS["tracking"].make_task(3, 5, 2).dataset(1, 0)[0])
    table = format_table(results).splitlines()
    assert table[0].startswith("construction") and set(table[1]) <= {"-", " "} and table[2].startswith("tracking")


def test_theory_without_subcommand_shows_help(capsys):
    assert main(["theory"]) == 2
    assert "verify" in capsys.readouterr().out
