"""The lm-evaluation-harness model `hybridlm`: scores against direct computations, batching, and
lm_eval.simple_evaluate end to end on tasks defined in local YAML over a local JSONL file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the dev extras")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from hybridlm.cli.main import main  # noqa: E402
from hybridlm.evaluate.harness import HybridLMEval  # noqa: E402
from hybridlm.models import HybridLM  # noqa: E402

DOCS = [
    {"question": "What does def start?", "choices": ["a function", "a class", "a loop"], "answer": 0,
     "target": "a function", "text": "def add(a, b):\n    return a + b\n"},
    {"question": "Which keyword imports?", "choices": ["import", "return"], "answer": 0,
     "target": "import", "text": "import os\nprint(os.getcwd())\n"},
    {"question": "What is None?", "choices": ["a constant", "a module", "a string", "a number"], "answer": 0,
     "target": "a constant",
     "text": "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"},
    {"question": "What ends a block?", "choices": ["dedent", "brace"], "answer": 1, "target": "dedent",
     "text": "for i in range(10):\n    if i % 2:\n        continue\n    print(i)\n" * 3},
]

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
{body}
metadata:
  version: 1.0
"""
TASK_BODIES = {
    "hybridlm_mc": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc""",
    "hybridlm_gen": """output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match""",
    "hybridlm_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    for name, body in TASK_BODIES.items():
        (root / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, cache=root / "cache", body=body))
    return root


@pytest.fixture(scope="module")
def harness_model(hf_checkpoint):
    return HybridLMEval(pretrained=str(hf_checkpoint), batch_size=3)


def direct_log_prob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids).logits[0].double(), dim=-1)
    rows = log_probs[len(context) - 1 : -1]
    targets = torch.tensor(continuation)
    return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def test_registered_with_lm_eval():
    assert get_model("hybridlm") is HybridLMEval


def test_scores_equal_direct_computation_in_any_batching(harness_model, hf_checkpoint):
    model = HybridLM.from_pretrained(hf_checkpoint).eval()
    tokenizer = harness_model.hybrid_tokenizer
    pairs = [(tokenizer.encode(doc["question"]), tokenizer.encode(" " + choice)) for doc in DOCS[:2]
             for choice in doc["choices"]]
    pairs.append(([harness_model.eot_token_id], tokenizer.encode(DOCS[3]["text"])))  # a long one among short ones
    expected = [direct_log_prob(model, context, continuation) for context, continuation in pairs]
    for batch_size in (1, 4):
        harness_model.batch_size = batch_size
        got = harness_model.score_pairs(pairs)
        assert [g[1] for g in got] == [e[1] for e in expected]
        for (log_prob, _), (want, _) in zip(got, expected):
            assert log_prob == pytest.approx(want, rel=1e-4, abs=1e-4)
    harness_model.batch_size = 3


def test_rolling_loglikelihood_is_the_whole_text_log_prob(harness_model, hf_checkpoint):
    model = HybridLM.from_pretrained(hf_checkpoint).eval()
    text = DOCS[3]["text"]
    tokens = harness_model.tok_encode(text)
    want, _ = direct_log_prob(model, [harness_model.eot_token_id], tokens)
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    assert harness_model.loglikelihood_rolling([request])[0] == pytest.approx(want, rel=1e-4)
    # Windows shorter than the text: every token is still predicted once, with less context.
    short = HybridLMEval(pretrained=str(hf_checkpoint), max_length=16, batch_size=2)
    windowed = short.loglikelihood_rolling([request])[0]
    assert windowed < 0 and windowed != pytest.approx(want, rel=1e-6)


def test_simple_evaluate_on_local_tasks(task_dir, harness_model, hf_checkpoint):
    results = lm_eval.simple_evaluate(
        model="hybridlm",
        model_args=f"pretrained={hf_checkpoint},batch_size=3",
        tasks=["hybridlm_mc", "hybridlm_gen", "hybridlm_ppl"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
    )
    scores = results["results"]
    assert 0.0 <= scores["hybridlm_mc"]["acc,none"] <= 1.0
    assert 0.0 <= scores["hybridlm_gen"]["exact_match,none"] <= 1.0
    assert scores["hybridlm_ppl"]["word_perplexity,none"] > 1.0

    model = HybridLM.from_pretrained(hf_checkpoint).eval()
    tokenizer = harness_model.hybrid_tokenizer
    for sample in results["samples"]["hybridlm_mc"]:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        for choice, response in zip(doc["choices"], sample["resps"]):
            whole = tokenizer.encode(context + " " + choice)
            head = tokenizer.encode(context)
            want = direct_log_prob(model, head, whole[len(head) :])
            assert float(response[0][0]) == pytest.approx(want[0], rel=1e-4)
    for sample in results["samples"]["hybridlm_gen"]:
        prompt = tokenizer.encode(f"Q: {sample['doc']['question']}\nA:")
        generated = model.generate([prompt], max_new_tokens=6, stop_token_ids=[tokenizer.eos_token_id])[0]
        want = tokenizer.decode(generated, skip_special_tokens=True).split("\n")[0]
        assert sample["resps"][0][0] == want


def test_harness_command_runs_lm_eval_cli(tmp_path, task_dir, hf_checkpoint):
    out = tmp_path / "out"
    code = main(["eval", "harness", "--model_args", f"pretrained={hf_checkpoint}", "--tasks", "hybridlm_mc",
                 "--include_path", str(task_dir), "--batch_size", "2", "--output_path", str(out)])
    assert code == 0
    written = list(out.rglob("results_*.json"))
    assert len(written) == 1
    assert "hybridlm_mc" in json.loads(written[0].read_text())["results"]


def test_bad_input(tmp_path, hf_checkpoint, harness_model):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((hf_checkpoint / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        HybridLMEval(pretrained=str(empty))
    with pytest.raises(ValueError, match="'auto' is not supported"):
        HybridLMEval(pretrained=str(hf_checkpoint), batch_size="auto")
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 1024"):
        HybridLMEval(pretrained=str(hf_checkpoint), max_length=4096)
    request = Instance("generate_until", {}, ("def", {"until": ["\n"], "num_beams": 4}), 0)
    with pytest.raises(ValueError, match="unsupported generation settings \\['num_beams'\\]"):
        harness_model.generate_until([request])


def _python_with_site(site_dir, code: str) -> subprocess.CompletedProcess:
    """A fresh interpreter that processes site_dir's .pth files (as site-packages would) and runs code."""
    prelude = f"import site, sys; site.addsitedir({str(site_dir)!r}); "
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=600)


def test_plugin_registers_the_model_lazily_for_plain_lm_eval(tmp_path):
    """After `hybridlm eval plugin install`, a fresh interpreter knows model `hybridlm` in lm-eval's registry,
    and start-up imports neither hybridlm nor torch; `remove` takes it away again."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    assert main(["eval", "plugin", "install", "--site-dir", str(site_dir)]) == 0
    assert (site_dir / "hybridlm-lm-eval.pth").exists()
    probe = (
        "assert 'hybridlm' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules); "
        "from lm_eval.api.registry import get_model; print(get_model('hybridlm').__module__)"
    )
    done = _python_with_site(site_dir, probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hybridlm.evaluate.harness"
    assert main(["eval", "plugin", "remove", "--site-dir", str(site_dir)]) == 0
    done = _python_with_site(site_dir, "from lm_eval.api.registry import get_model; get_model('hybridlm')")
    assert done.returncode != 0 and "hybridlm" in done.stderr


def test_plain_lm_eval_command_line_runs_hybridlm(tmp_path, task_dir, hf_checkpoint):
    """`lm_eval --model hybridlm ...` (lm-eval's own entry point, not ours) with the plugin installed."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    assert main(["eval", "plugin", "install", "--site-dir", str(site_dir)]) == 0
    out = tmp_path / "out"
    argv = ["lm_eval", "--model", "hybridlm", "--model_args", f"pretrained={hf_checkpoint}", "--tasks", "hybridlm_mc",
            "--include_path", str(task_dir), "--batch_size", "2", "--output_path", str(out)]
    done = _python_with_site(site_dir, f"sys.argv = {argv!r}; from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
    assert done.returncode == 0, done.stderr[-3000:]
    written = list(out.rglob("results_*.json"))
    assert len(written) == 1 and "hybridlm_mc" in json.loads(written[0].read_text())["results"]
