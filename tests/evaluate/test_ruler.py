"""The RULER-style generators (answers recoverable from the prompt by a simple parser, lengths, determinism),
scoring, the runner through the inference engine, the command, and bad input."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from hybridlm.cli.main import main
from hybridlm.evaluate import limits as limits_module
from hybridlm.evaluate.ruler import (
    TASKS,
    answer_text,
    RulerRun,
    check_ruler_limits,
    corpus_lines,
    generate_sample,
    prepare_samples,
    resolve_tasks,
    run_ruler,
    score_prediction,
    write_ruler_outputs,
)
from hybridlm.evaluate.ruler import runner as runner_module
from hybridlm.evaluate.ruler.runner import answer_losses

# What a reader of the prompt looks for, per template: needles (key, value), the keys asked for, variable
# assignments and the value asked for, list items, the coded text.
PATTERNS = {
    "text": {
        "needle": r"One of the special magic \w+ for ([\w-]+) is: ([\w-]+)\.",
        "query": r"What (?:is|are all) the special magic \w+ for (.+?) mentioned in the provided text\?",
        "vt_value": r"VAR (\w+) = (\d+)\.",
        "vt_copy": r"VAR (\w+) = VAR (\w+)\.",
        "vt_query": r"assigned the value (\d+) in the text above",
        "cwe_item": r"\d+\. ([a-z]+)",
        "fwe_body": r"coded words\.\n(.*)\nQuestion:",
    },
    "code": {
        "needle": r'^special_magic_\w+\["([\w-]+)"\] = ([\w-]+)$',
        "query": r'^special_magic_\w+\["([\w-]+)"\] =$'
        r'|assigned to special_magic_\w+\["([\w-]+)"\] above'
        r"|for key in \[(.+?)\]:",
        "vt_value": r"^(\w+) = (\d+)$",
        "vt_copy": r"^(\w+) = ([A-Z]+)$",
        "vt_query": r"bound to the value (\d+) above",
        "cwe_item": r'^    "([a-z]+)",$',
        "fwe_body": r'coded = """\n(.*)\n"""',
    },
}


def parse_answers(task: str, template: str, prompt: str) -> list[str]:
    """Recover the expected answers from the prompt text alone, as a reader would."""
    patterns = PATTERNS[template]
    flags = re.MULTILINE
    if task.startswith("niah"):
        values: dict[str, list[str]] = {}
        for key, value in re.findall(patterns["needle"], prompt, flags):
            values.setdefault(key, []).append(value)
        matches = [m if isinstance(m, tuple) else (m,) for m in re.findall(patterns["query"], prompt, flags)]
        asked = " ".join(group for match in matches for group in match if group)
        keys = re.findall(r"[a-z]+-[a-z]+", asked)
        assert len(keys) == (4 if task == "niah_multiquery" else 1), (task, asked)
        return [value for key in keys for value in values[key]]
    if task == "vt":
        bound = dict(re.findall(patterns["vt_value"], prompt, flags))
        target = re.search(patterns["vt_query"], prompt).group(1)
        names = [name for name, value in bound.items() if value == target]
        for name, source in re.findall(patterns["vt_copy"], prompt, flags):
            if source in names:
                names.append(name)
        return names
    if task == "cwe":
        counts = Counter(re.findall(patterns["cwe_item"], prompt, flags))
        ranked = counts.most_common()
        assert ranked[9][1] > ranked[10][1] if len(ranked) > 10 else True
        return [word for word, _ in ranked[:10]]
    if task == "fwe":
        body = re.search(patterns["fwe_body"], prompt, re.DOTALL).group(1)
        ranked = Counter(body.split()).most_common()
        assert ranked[2][1] > ranked[3][1]
        return [word for word, _ in ranked[:3]]
    raise AssertionError(task)


@pytest.mark.parametrize("template", ["text", "code"])
@pytest.mark.parametrize("task", list(TASKS))
def test_answers_are_recoverable_from_the_prompt(task, template, eval_tokenizer):
    shortest = 2048 if task == "cwe" else 1024  # cwe's ten common words take ~500 tokens of this small vocabulary
    for length, index in ((shortest, 0), (shortest, 1), (2 * shortest, 2)):
        sample = generate_sample(task, length=length, index=index, seed=3, tokenizer=eval_tokenizer, template=template)
        expected = parse_answers(task, template, sample.prompt)
        if task == "vt":  # the chain, in order of assignment
            assert sample.answers == expected
        else:
            assert sorted(sample.answers) == sorted(expected)
        budget = length - TASKS[task].max_new_tokens
        assert sample.prompt_tokens == len(eval_tokenizer.encode(sample.prompt)) <= budget
        assert sample.prompt_tokens >= 0.9 * budget  # filled up to within a haystack unit or two


def test_samples_are_deterministic_and_vary_with_seed_and_index(eval_tokenizer):
    for task in TASKS:
        first = generate_sample(task, length=2048, index=0, seed=7, tokenizer=eval_tokenizer)
        again = generate_sample(task, length=2048, index=0, seed=7, tokenizer=eval_tokenizer)
        assert first == again
        assert generate_sample(task, length=2048, index=0, seed=8, tokenizer=eval_tokenizer).prompt != first.prompt
        assert generate_sample(task, length=2048, index=1, seed=7, tokenizer=eval_tokenizer).prompt != first.prompt


def test_needles_land_at_spread_depths_and_uuid_values(eval_tokenizer):
    depths = []
    for index in range(30):
        sample = generate_sample("niah_single", length=1024, index=index, seed=0, tokenizer=eval_tokenizer)
        before, after = sample.prompt.split("One of the special magic")
        depths.append(before.count("The grass") / (before.count("The grass") + after.count("The grass")))
    assert min(depths) < 0.15 and max(depths) > 0.85
    sample = generate_sample("niah_multikey", length=1024, index=0, seed=0, tokenizer=eval_tokenizer, value_kind="uuid")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", sample.answers[0])
    assert parse_answers("niah_multikey", "text", sample.prompt) == sample.answers


def test_corpus_haystack_uses_corpus_lines(eval_tokenizer):
    text = "def first():\n    return 1\n\n\nclass Second:\n    pass\n"
    lines = corpus_lines(text)
    assert lines == ["def first():", "    return 1", "class Second:", "    pass"]
    sample = generate_sample("niah_multiquery", length=512, index=0, seed=0, tokenizer=eval_tokenizer,
                             template="code", haystack="corpus", corpus=lines)
    assert "class Second:\n    pass" in sample.prompt and "The grass is green" not in sample.prompt
    assert sorted(parse_answers("niah_multiquery", "code", sample.prompt)) == sorted(sample.answers)
    with pytest.raises(ValueError, match="needs corpus text"):
        generate_sample("niah_single", length=512, index=0, seed=0, tokenizer=eval_tokenizer, haystack="corpus")


def test_scoring_is_rulers_string_match_all():
    assert score_prediction(" 1234567.", ["1234567"]) == 1.0
    assert score_prediction("ABCDE, fghij and KLMNO", ["abcde", "FGHIJ", "klmno", "PQRST"]) == 0.75
    assert score_prediction("nothing", ["1", "2"]) == 0.0


class AnsweringModel:
    """Stands in for a HybridLM: answers each prompt with its expected values (or a wrong number), to test
    the runner's batching, decoding and scoring without depending on what a random model says."""

    def __init__(self, real_model, tokenizer, samples, wrong_every: int):
        self.real_model = real_model  # the answer loss is a forward pass: the real model computes it
        self.tokenizer = tokenizer
        self.answers = {tuple(tokenizer.encode(s.prompt)): s.answers for group in samples.values() for s in group}
        self.calls = []
        self.wrong_every = wrong_every
        self.count = 0

    def __call__(self, *args, **kwargs):
        return self.real_model(*args, **kwargs)

    def __getattr__(self, name):  # config, lm_head, allocate_cache: the real model's
        return getattr(self.real_model, name)

    def generate(self, prompts, **options):
        self.calls.append((len(prompts), options["max_new_tokens"], options["temperature"]))
        out = []
        for prompt in prompts:
            self.count += 1
            answers = self.answers[tuple(prompt)] if self.count % self.wrong_every else ["0000000"]
            out.append(self.tokenizer.encode(" " + ", ".join(answers)) + [self.tokenizer.eos_token_id])
        return out


def test_runner_scores_tables_and_plot(tmp_path, make_eval_model, eval_tokenizer):
    samples = prepare_samples(["niah_single", "vt"], [512], tokenizer=eval_tokenizer, samples=4, seed=0)
    stand_in = AnsweringModel(make_eval_model(), eval_tokenizer, samples, wrong_every=4)
    run = run_ruler(stand_in, eval_tokenizer, samples, batch_size=3, name="oracle")
    assert [c[0] for c in stand_in.calls] == [3, 1] * 2 and all(c[2] == 0.0 for c in stand_in.calls)
    assert {c[1] for c in stand_in.calls} == {TASKS["niah_single"].max_new_tokens, TASKS["vt"].max_new_tokens}
    assert run.scores == {"niah_single": {512: 75.0}, "vt": {512: 75.0}}
    assert run.average(512) == 75.0 and len(run.records) == 8
    assert set(run.answer_loss) == {"niah_single", "vt"} and all(r["answer_loss"] > 0 for r in run.records)
    other = RulerRun("other", scores={"niah_single": {512: 10.0, 1024: 0.0}}, exact={"niah_single": {512: 10.0}})
    paths = write_ruler_outputs([run, other], tmp_path, settings={"seed": 0}, train_lengths={"oracle": 512})
    table = paths["table"].read_text()
    assert "| oracle | 75.0 | - |" in table and "| other | 10.0 | 0.0 |" in table
    assert "| **average** | **75.0** |" in table
    assert "oracle: answer loss (nats) by task and length" in table and paths["answer_loss_plot"].is_file()
    results = json.loads(paths["results"].read_text())
    assert results["models"][0]["scores"]["vt"]["512"] == 75.0
    assert paths["plot"].stat().st_size > 5000
    assert len(paths["samples-oracle"].read_text().splitlines()) == 8


def test_answer_loss_equals_a_direct_computation(make_eval_model, eval_tokenizer, monkeypatch):
    """Left-padded, in prefill chunks of 96 / 3 = 32 positions through the cache, against one plain forward each."""
    model = make_eval_model()
    samples = [generate_sample(task, length=length, index=0, seed=0, tokenizer=eval_tokenizer)
               for task, length in (("niah_single", 512), ("vt", 600), ("niah_multiquery", 700))]
    monkeypatch.setattr(runner_module, "PREFILL_CHUNK_TOKENS", 96)
    batched = answer_losses(model, eval_tokenizer, samples)
    for sample, loss in zip(samples, batched):
        prompt = eval_tokenizer.encode(sample.prompt)
        answer = eval_tokenizer.encode(sample.prompt + answer_text(sample.answers))[len(prompt) :]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].double(), -1)
        want = -float(log_probs[len(prompt) - 1 : -1].gather(1, torch.tensor(answer)[:, None]).sum())
        assert loss == pytest.approx(want, rel=1e-4)


def test_runner_through_the_inference_engine(make_eval_model, eval_tokenizer):
    """A real (random) model: every sample is answered and scored; the engine's greedy output is reproducible."""
    model = make_eval_model()
    samples = prepare_samples(["niah_single"], [512], tokenizer=eval_tokenizer, samples=3, seed=0)
    first = run_ruler(model, eval_tokenizer, samples, batch_size=2)
    second = run_ruler(model, eval_tokenizer, samples, batch_size=1)
    assert first.answer_loss["niah_single"][512] == pytest.approx(second.answer_loss["niah_single"][512], rel=1e-5)
    assert [r["prediction"] for r in first.records] == [r["prediction"] for r in second.records]
    assert all(0.0 <= score <= 100.0 for by in first.scores.values() for score in by.values())
    assert all(r["prediction"] for r in first.records)


def test_eval_ruler_command(tmp_path, hf_checkpoint, capsys):
    out = tmp_path / "ruler"
    code = main(["eval", "ruler", str(hf_checkpoint), "--lengths", "512,640", "--tasks", "niah_single,vt",
                 "--samples", "1", "--template", "code", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["lengths"] == [512, 640] and results["settings"]["template"] == "code"
    assert set(results["models"][0]["scores"]) == {"niah_single", "vt"}
    assert (out / "ruler.png").is_file() and (out / "samples-tiny-hybrid.jsonl").is_file()
    assert "| niah_single |" in capsys.readouterr().out


def test_bad_input_is_refused_before_generation(tmp_path, hf_checkpoint, make_eval_model, eval_tokenizer, capsys,
                                                 monkeypatch):
    with pytest.raises(ValueError, match="unknown RULER task.*niah_single, niah_multikey"):
        resolve_tasks("niah_single,needle_in_a_haystack")
    assert resolve_tasks("all") == list(TASKS)
    with pytest.raises(ValueError, match="does not fit in length 128"):
        generate_sample("niah_multiquery", length=128, index=0, seed=0, tokenizer=eval_tokenizer)
    with pytest.raises(ValueError, match="task cwe does not fit in length 1024"):
        generate_sample("cwe", length=1024, index=0, seed=0, tokenizer=eval_tokenizer)
    model = make_eval_model()
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 1024"):
        check_ruler_limits(model, [512, 2048], batch_size=1)
    monkeypatch.setattr(limits_module, "available_memory", lambda device: 2**20)
    with pytest.raises(ValueError, match="lower --batch-size or the longest of --lengths"):
        check_ruler_limits(model, [1024], batch_size=8)
    monkeypatch.undo()

    def fails(args, message):
        assert main(["eval", "ruler", str(hf_checkpoint), *args, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err

    fails(["--lengths", "512", "--tasks", "nope"], "unknown RULER task")
    fails(["--lengths", "512,8k"], "exceeds the model's max_seq_len 1024")
    fails(["--lengths", "5l2"], "is not a length")
    fails(["--lengths", "128", "--tasks", "niah_multiquery"], "does not fit in length 128")
    assert not (tmp_path / "x").exists()
