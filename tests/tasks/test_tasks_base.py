"""Knobs and their errors, the registry, vocabularies, collation and exact-match accuracy."""

import pytest
import torch

from hybridlm.tasks import (IGNORE_INDEX, TASKS, Vocabulary, accuracy, code_tokens, collate, exact_matches,
                            get_task)


def test_registry_and_unknown_names():
    assert list(TASKS) == ["parity", "modular_counting", "word_problem", "mqar", "state_recall", "state_tracking",
                           "bit_recall", "boolean_formula"]
    for name, cls in TASKS.items():
        assert cls.name == name and isinstance(get_task(name), cls)
    with pytest.raises(ValueError, match="valid tasks: parity, modular_counting, word_problem, mqar"):
        get_task("s5")
    with pytest.raises(ValueError, match="has no knob bits; its knobs are: m, k, n, mode, max_bits"):
        get_task("state_recall", bits=3)


@pytest.mark.parametrize(
    "name, knobs, message",
    [
        ("state_recall", {"n": -1}, r"n=-1 is invalid: expected an integer in \[0, 65536\] or a range"),
        ("state_recall", {"k": 27}, r"k=27 is invalid: expected an integer in \[1, 26\]"),
        ("state_recall", {"k": 6, "m": (5, 9)}, r"k=6 pointers .* need k <= smallest m \(valid k: 1..5"),
        ("state_recall", {"m": 200}, r"raise max_bits to at least 200"),
        ("state_tracking", {"k": 1}, r"k must be >= 2 when n > 0"),
        ("state_recall", {"mode": "rotate"}, r"expected one of swap, permute"),
        ("state_recall", {"n": (9, 4)}, r"lo must not exceed hi"),
        ("state_recall", {"n": 2.5}, r"expected an integer"),
        ("state_recall", {"n": True}, r"expected an integer"),
        ("mqar", {"num_pairs": 20, "seq_len": 128, "vocab_size": 40}, r"need num_pairs <= 19 or vocab_size >= 42"),
        ("mqar", {"num_pairs": 20, "seq_len": 70}, r"need the largest seq_len >= 4 \* num_pairs = 80"),
        ("mqar", {"power_a": 0.0}, r"expected a number in \[1e-06, 1\]"),
        ("word_problem", {"group": "S6"}, r"one of S5, A5, A4xZ5, Z60"),
        ("modular_counting", {"modulus": 1}, r"modulus=1 is invalid: expected an integer in \[2, 1000\]"),
        ("boolean_formula", {"depth": 30}, r"expected an integer in \[0, 24\]"),
        ("parity", {"length": 0}, r"expected an integer in \[1, 65536\]"),
    ],
)
def test_bad_knobs_name_the_valid_range(name, knobs, message):
    with pytest.raises(ValueError, match=message):
        get_task(name, **knobs)


def test_knob_forms():
    task = get_task("state_recall", m="8:12", n=3, k=4)
    assert task.knobs["m"] == (8, 12) and task.knobs["n"] == (3, 3) and task.knobs["k"] == 4
    spec = task.knob("n")
    assert spec.parse("4:16") == (4, 16) and spec.parse("7") == (7, 7) and spec.format((4, 16)) == "4:16"
    assert task.knob("mode").parse("permute") == "permute"
    with pytest.raises(ValueError, match="expected an integer"):
        spec.parse("four")
    assert "StateBasedRecall(m=8:12, k=4, n=3, mode=swap" in repr(task)
    examples = task.dataset(50, seed=0)
    assert {e.size["m"] for e in examples} <= set(range(8, 13)) and len({e.size["m"] for e in examples}) > 2
    assert {e.size["n"] for e in examples} == {3}
    with pytest.raises(ValueError, match="non-negative number of examples"):
        task.dataset(-1, seed=0)


def test_vocabulary():
    vocab = Vocabulary(["=", "0", "1"])
    assert vocab.tokens == ("<pad>", "=", "0", "1") and vocab.pad_id == 0 and len(vocab) == 4
    assert vocab.encode(["1", "=", "0"]) == [3, 1, 2] and vocab.decode([3, 1, 2]) == ["1", "=", "0"]
    with pytest.raises(ValueError, match="token '2' is not in this vocabulary"):
        vocab.encode(["2"])
    with pytest.raises(ValueError, match=r"outside this vocabulary \(valid ids: 0..3\)"):
        vocab.decode([4])
    with pytest.raises(ValueError, match="must be unique"):
        Vocabulary(["a", "a"])


def test_code_tokens_keep_integers_whole():
    assert code_tokens("bits = [0, 1, 17]\na, c = c, a\nassert bits[a] == 1") == [
        "bits", "=", "[", "0", ",", "1", ",", "17", "]", "\n", "a", ",", "c", "=", "c", ",", "a", "\n",
        "assert", "bits", "[", "a", "]", "==", "1"]


def test_collate_pads_right_and_masks_targets():
    task = get_task("state_recall", m=(5, 30), n=(0, 9))
    examples = task.dataset(9, seed=0)
    batch = collate(examples)
    lengths = [len(e) for e in examples]
    assert batch.input_ids.shape == batch.targets.shape == batch.attention_mask.shape == (9, max(lengths))
    assert batch.input_ids.dtype == batch.targets.dtype == batch.attention_mask.dtype == torch.int64
    assert batch.attention_mask.sum(1).tolist() == lengths
    for row, example in enumerate(examples):
        length = lengths[row]
        assert batch.input_ids[row, :length].tolist() == example.input_ids
        assert batch.targets[row, :length].tolist() == example.targets
        assert (batch.input_ids[row, length:] == 0).all() and (batch.targets[row, length:] == IGNORE_INDEX).all()
    assert collate(examples, pad_to=300).input_ids.shape == (9, 300)
    with pytest.raises(ValueError, match="shorter than the longest example"):
        collate(examples, pad_to=10)
    with pytest.raises(ValueError, match="at least one example"):
        collate([])


def test_exact_match_accuracy():
    task = get_task("mqar", num_pairs=(2, 4), seq_len=(16, 24), vocab_size=40)
    examples = task.dataset(6, seed=1)
    batch = collate(examples)
    perfect = torch.where(batch.targets == IGNORE_INDEX, torch.randint(1, 40, batch.targets.shape), batch.targets)
    assert accuracy(examples, perfect) == 1.0
    assert accuracy(examples, perfect.tolist()) == 1.0
    wrong = perfect.clone()
    position = examples[2].supervised_positions[-1]
    wrong[2, position] = (wrong[2, position] % 39) + 1
    assert exact_matches(examples, wrong) == [True, True, False, True, True, True]
    assert accuracy(examples, wrong) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="take logits.argmax"):
        accuracy(examples, torch.zeros(6, batch.input_ids.shape[1], 40))
    with pytest.raises(ValueError, match="one each"):
        accuracy(examples, perfect[:5])
    with pytest.raises(ValueError, match="predict over the whole collated batch"):
        accuracy(examples, perfect[:, :10])
