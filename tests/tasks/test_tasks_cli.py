"""`hybridlm tasks list` and `hybridlm tasks sample`."""

from hybridlm.cli.main import main
from hybridlm.tasks import TASKS, get_task


def test_list_shows_every_task_with_knobs(capsys):
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    for name in TASKS:
        assert f"\n{name}: " in f"\n{out}"
    assert "k = 5: number of pointer variables (named a, b, c, ...); valid: an integer in [1, 26]" in out
    assert "m = 16:32 [length]" in out


def test_sample_prints_text_answers_and_tokens(capsys):
    assert main(["tasks", "sample", "state_recall", "--n", "2", "--seed", "4", "--set", "m=8:12",
                 "--set", "n=3", "--tokens"]) == 0
    out = capsys.readouterr().out
    examples = get_task("state_recall", m=(8, 12), n=3).dataset(2, seed=4)
    for example in examples:
        assert example.text in out and f"answer: {example.answer_text}" in out
        assert f"input_ids: {example.input_ids}" in out
    assert out.count("--- example") == 2 and "-> " in out


def test_sample_without_tokens_and_errors(capsys):
    assert main(["tasks", "sample", "word_problem", "--n", "1", "--set", "group=A5"]) == 0
    out = capsys.readouterr().out
    assert "group = 'A5'" in out and "input_ids" not in out
    assert main(["tasks", "sample", "state_recall", "--set", "k=40"]) == 2
    assert "k=40 is invalid: expected an integer in [1, 26]" in capsys.readouterr().out
    assert main(["tasks", "sample", "nope"]) == 2
    assert "valid tasks: parity" in capsys.readouterr().out
    assert main(["tasks", "sample", "parity", "--set", "length"]) == 2
    assert "--set expects knob=value" in capsys.readouterr().out
    assert main(["tasks"]) == 2
