"""The hand-set constructions: exact answers on random instances, through the forward and the decode
path, with the designed margins; the states they claim to hold; what breaks without beta > 1."""

import math

import pytest
import torch

from hybridlm.tasks import BitRecall, Parity, StateBasedRecall, StateTracking
from hybridlm.theory import (
    build_bit_recall_model,
    build_parity_model,
    build_state_recall_model,
    build_tracking_model,
)
from hybridlm.theory.programs import CODE_OFFSET, MODULI, code_gap, code_planes, embedding_features, index_code
from hybridlm.theory.retrieval import bit_index_features
from hybridlm.theory.verify import run_instances

# Fixed sizes per case (so a case's instances share one length and run as one batch), varied across cases.
CASES = {
    "parity-prefix": (lambda: Parity(length=(257, 257), labels="prefix"), build_parity_model, 0.5),
    "parity-final": (lambda: Parity(length=(1, 1), labels="final"), build_parity_model, 0.5),
    "tracking": (lambda: StateTracking(n=(40, 40), m=(70, 70), k=7, max_bits=70), build_tracking_model,
                 code_gap(3) / 3),
    "tracking-k2": (lambda: StateTracking(n=(25, 25), m=(3, 3), k=2, max_bits=3), build_tracking_model,
                    code_gap(1)),
    "tracking-n0": (lambda: StateTracking(n=(0, 0), m=(17, 17), k=4, max_bits=17), build_tracking_model,
                    code_gap(2) / 2),
    "bit_recall": (lambda: BitRecall(m=(70, 70), max_bits=70), build_bit_recall_model, 1.0),
    "bit_recall-m1": (lambda: BitRecall(m=(1, 1), max_bits=2), build_bit_recall_model, 1.0),
    "state_recall": (lambda: StateBasedRecall(n=(30, 30), m=(33, 33), k=26, max_bits=33), build_state_recall_model,
                     1.0),
    "state_recall-k3": (lambda: StateBasedRecall(n=(40, 40), m=(3, 3), k=3, max_bits=3), build_state_recall_model,
                        1.0),
}


@pytest.mark.parametrize("name", CASES)
def test_exact_on_random_instances_forward_and_decode(name):
    make_task, build, margin = CASES[name]
    task = make_task()
    examples = task.dataset(16, seed=7)
    result = run_instances(build(task), examples, name, repr(task), decode_instances=len(examples))
    assert (result.exact, result.decode_exact) == (16, 16), result
    # The relative logit margin: exactly 1/2 for parity and 1 for a bit; for an index at least gap / P,
    # the code's worst case over all index pairs (the vocabulary may hold fewer indices).
    if name.startswith("tracking"):
        assert result.margin >= margin - 1e-3
    else:
        assert result.margin == pytest.approx(margin, abs=1e-3)


@pytest.mark.parametrize("build, task", [
    (build_parity_model, Parity(length=(150, 150), labels="prefix")),
    (build_state_recall_model, StateBasedRecall(n=(30, 30), m=(20, 20), k=5, max_bits=20)),
])
def test_float64_models_are_exact_too(build, task):
    examples = task.dataset(4, seed=1)
    result = run_instances(build(task, dtype=torch.float64), examples, "f64", repr(task), decode_instances=1)
    assert result.passed and result.exact == 4


def test_chunked_and_recurrent_operator_agree():
    task = StateBasedRecall(n=(20, 20), m=(12, 12), k=4, max_bits=12)
    model = build_state_recall_model(task)
    ids = torch.tensor([example.input_ids for example in task.dataset(3, seed=2)])
    with torch.no_grad():
        chunk = model(ids, gdn_impl="chunk").logits
        recurrent = model(ids, gdn_impl="recurrent").logits
    position = task.dataset(1, seed=2)[0].supervised_positions[0]
    assert torch.equal(chunk[:, position].argmax(-1), recurrent[:, position].argmax(-1))
    torch.testing.assert_close(chunk[:, position], recurrent[:, position], rtol=1e-4, atol=1e-4)


def final_pointer_values(example) -> list[int]:
    """Run the program's init and swap lines (the test's own small interpreter)."""
    lines = example.prompt.split("\n")
    names = [name.strip() for name in lines[0].split("=")[0].split(",")]
    values = dict(zip(names, (int(v) for v in lines[0].split("=")[1].split(","))))
    for line in lines[1:-1]:
        targets, sources = ([x.strip() for x in side.split(",")] for side in line.split("="))
        values.update(zip(targets, [values[s] for s in sources]))
    return [values[name] for name in names]


def test_tracker_state_rows_are_the_codes_of_the_current_values():
    task = StateTracking(n=(200, 200), m=(50, 50), k=6, max_bits=50)
    model = build_tracking_model(task)
    planes = code_planes(50)
    for example in task.dataset(2, seed=5):
        position = example.supervised_positions[0]
        cache = model.allocate_cache(1, position)
        with torch.no_grad():
            model(torch.tensor([example.input_ids[:position]]), cache=cache, compute_logits=False)
        state = cache.layers[1].recurrent_state[0, 0].double()  # tracker head: [K, V]
        for row, value in enumerate(final_pointer_values(example)):
            ideal = torch.tensor([CODE_OFFSET + x for pair in index_code(value, planes) for x in pair] + [CODE_OFFSET],
                                 dtype=torch.float64)
            got = state[row, : 2 * planes + 1]
            got = got * (CODE_OFFSET / got[-1])  # rows carry the write position's (positive) input scale
            torch.testing.assert_close(got, ideal, rtol=0, atol=1e-4)


def test_parity_state_is_the_reflection_of_its_centre():
    task = Parity(length=(300, 300), labels="prefix")
    model = build_parity_model(task)
    example = task.dataset(1, seed=3)[0]
    cache = model.allocate_cache(1, len(example))
    with torch.no_grad():
        model(torch.tensor([example.input_ids]), cache=cache, compute_logits=False)
    state = float(cache.layers[0].recurrent_state.flatten()[0])
    ones = sum(token == "1" for token in task.decode(example.input_ids))
    centre = float(torch.nn.functional.silu(model.model.layers[0].linear_attn.v_proj.weight[0, 1].double()
                                            * model.model.layers[0].input_layernorm(
                                                model.model.embed_tokens.weight[task.vocab.id("1")][None])[0, 1]))
    assert state == pytest.approx(2 * centre * (ones % 2), abs=1e-9)


@pytest.mark.parametrize("build, task", [
    (build_parity_model, Parity(length=(64, 64), labels="prefix")),
    (build_tracking_model, StateTracking(n=(20, 20), m=(10, 10), k=4, max_bits=10)),
])
def test_without_negative_eigenvalues_the_constructions_fail(build, task):
    """beta = sigmoid(b) <= 1 instead of 2 sigmoid(b): the reflections become projections."""
    model = build(task)
    examples = task.dataset(16, seed=0)
    assert run_instances(model, examples, "neg", "").exact == 16
    for block in model.model.layers:
        block.linear_attn.neg_eigval = False
    assert run_instances(model, examples, "no-neg", "", decode_instances=0).exact < 16


def test_sizes_and_head_counts_stay_small():
    model = build_state_recall_model(StateBasedRecall(n=(10, 10), m=(1000, 1000), k=5, max_bits=1000))
    config = model.config
    assert config.layout == "GGA" and config.d_model < 100
    assert config.gdn_key_heads == 5 and config.head_dim == 2 * code_planes(1000) == 8
    assert model.config.gdn_neg_eigval and model.config.gdn_use_decay


@pytest.mark.parametrize("build, task, message", [
    (build_tracking_model, StateTracking(m=(8, 8), k=3, mode="permute"), "swap lines"),
    (build_state_recall_model, StateBasedRecall(m=(8, 8), k=3, mode="permute"), "swap lines"),
    (build_tracking_model, StateBasedRecall(m=(8, 8), k=3), "needs a StateTracking task"),
    (build_parity_model, BitRecall(), "needs a Parity task"),
    (build_bit_recall_model, Parity(), "needs a BitRecall task"),
    (build_state_recall_model, StateTracking(), "needs a StateBasedRecall task"),
])
def test_unsupported_tasks_are_refused(build, task, message):
    with pytest.raises(ValueError, match=message):
        build(task)


def test_index_code_gap():
    for planes in range(1, 5):
        size = math.prod(MODULI[:planes])
        codes = torch.tensor([index_code(i, planes) for i in range(size)], dtype=torch.float64).flatten(1)
        gram = codes @ codes.T
        assert torch.allclose(gram.diagonal(), torch.full((size,), float(planes), dtype=torch.float64))
        off = gram - torch.diag(gram.diagonal())
        assert float(off.max()) <= planes - code_gap(planes) + 1e-12
        assert float(off.max()) >= planes - code_gap(planes) - 1e-12  # the bound is attained
    assert [code_planes(m) for m in (1, 5, 6, 35, 36, 280, 1000, 2520, 2521, 16384)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert index_code(1, 1) == [(-math.cos(2 * math.pi / 5), math.sin(2 * math.pi / 5))]
    with pytest.raises(ValueError, match="covers 1..27720"):
        code_planes(30000)


def test_counters_follow_the_index_code_to_the_largest_list():
    """The bit-index heads' rotations stay on the code (drift of the chunked float32 operator included)."""
    task = BitRecall(m=(6000, 6000), max_bits=16384)
    model = build_bit_recall_model(task)
    example = task.dataset(1, seed=0)[0]
    with torch.no_grad():
        hidden = model.model.layers[0](model.model.embed_tokens(torch.tensor([example.input_ids])))
    planes = code_planes(16384)
    # bit_recall's residual: the embedding features, then bitidx:<f>:<c> (see build_bit_recall_model).
    first = len(embedding_features(0, planes))
    columns = [first + position for position, _ in enumerate(bit_index_features(planes))]
    positions = torch.arange(0, 6000, 13)
    got = hidden[0, 3 + 2 * positions][:, columns].double()
    ideal = torch.tensor([[x for pair in index_code(int(i), planes) for x in pair] for i in positions],
                         dtype=torch.float64)
    assert float((got - ideal).abs().sum(-1).max()) < code_gap(planes) / 4
