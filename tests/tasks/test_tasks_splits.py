"""Longer-than-training test sets."""

import pytest

from hybridlm.tasks import TASKS, get_task, length_split, longer_knobs


@pytest.mark.parametrize("name", sorted(TASKS))
def test_test_examples_are_longer_on_every_length_knob(name):
    split = length_split(name, n_train=40, n_test=40, n_valid=10, seed=3)
    assert split.train_task.vocab == split.test_task.vocab
    length_knobs = [spec.name for spec in split.train_task.knob_specs if spec.length]
    assert length_knobs
    for knob in length_knobs:
        train_high = max(e.size[knob] for e in split.train + split.valid)
        assert train_high <= split.train_task.knobs[knob][1]
        assert min(e.size[knob] for e in split.test) > split.train_task.knobs[knob][1]
    mean_length = {part: sum(map(len, getattr(split, part))) / 40 for part in ("train", "test")}
    assert mean_length["test"] > 1.3 * mean_length["train"]
    assert len(split.train) == 40 and len(split.test) == 40 and len(split.valid) == 10
    assert split.train == split.train_task.dataset(40, 3)
    for example in split.test:
        assert split.test_task.reference_solve(example) == example.answer


def test_longer_knobs_rule_and_selection():
    knobs = longer_knobs("state_recall", {"m": (16, 32), "n": (4, 16), "mode": "permute"})
    assert knobs == {"m": (33, 64), "k": 5, "n": (17, 32), "mode": "permute", "max_bits": 128}
    only_lines = longer_knobs("state_recall", {"m": (16, 32), "n": (4, 16)}, lengthen=["n"], factor=3)
    assert only_lines["m"] == (16, 32) and only_lines["n"] == (17, 48)
    assert longer_knobs("parity", {"length": 1})["length"] == (2, 2)
    assert longer_knobs("boolean_formula", {"depth": (1, 20)})["depth"] == (21, 24)  # capped at the maximum


def test_split_errors():
    with pytest.raises(ValueError, match="raise max_bits to at least 128"):
        length_split("state_recall", {"m": 64, "max_bits": 64}, n_train=1, n_test=1)
    with pytest.raises(ValueError, match="not a length knob of 'state_recall'; its length knobs are: m, n"):
        longer_knobs("state_recall", lengthen=["k"])
    with pytest.raises(ValueError, match="already reaches its maximum 24"):
        longer_knobs("boolean_formula", {"depth": 24})
    with pytest.raises(ValueError, match="factor must be > 1"):
        longer_knobs("parity", factor=1.0)
    with pytest.raises(ValueError, match="either a Task instance or a task name"):
        longer_knobs(get_task("parity"), {"length": 3})
