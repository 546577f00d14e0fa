"""RULER-style synthetic long-context tasks, generated locally and deterministically.

Seven tasks in RULER's three synthetic categories (Hsieh et al. 2024, arXiv 2404.06654):

    retrieval    niah_single      one needle "the magic number for KEY is VALUE" in a haystack; recall VALUE
                 niah_multikey    four needles with different keys; recall the value of one of them
                 niah_multivalue  four needles with the same key; recall all four values
                 niah_multiquery  four needles with different keys; recall the values of all four
    multi-hop    vt               variable tracking: X1 = 12345, X2 = X1, ... (4 hops); name every variable
                                  that holds 12345
    aggregation  cwe              common-word extraction: a numbered list where 10 words appear far more
                                  often than the rest; name those 10
                 fwe              frequent-word extraction: coded words drawn from a Zipf law (alpha 2);
                                  name the three most frequent

A sample's `length` counts the model's tokens: the prompt fills `length - max_new_tokens` tokens
as closely as the haystack's granularity allows (never more), leaving room for the answer. The
haystack is RULER's noise sentences repeated, or lines of a text corpus (e.g. the embedded
Python corpus), and the needles go at random depths. Everything random comes from a generator
seeded by (seed, task, length, index), so a sample is the same on every machine and run.

Two prompt templates: "text" words the prompts as RULER does (instructions, a question and the
start of the answer); "code" states the same tasks as Python source, for models trained on code,
where the prompt ends with the start of a line whose continuation is the answer.

A prediction is scored as RULER's string_match_all does: the fraction of the expected values that
appear in the generated text (case-insensitive); `exact` is 1 only when all of them do.

For models too small to answer at all, the answer loss is a finer measure: the negative
log-likelihood (nats) of the reference answer `answer_text(answers)` written right after the prompt,
teacher-forced. It is defined for the tasks whose answers have one natural order (`ordered`).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from hybridlm.evaluate.ruler.words import key_words, pseudo_words, variable_names


# Templates ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """How the tasks are worded. Placeholders: {kind} / {kinds} (number / numbers), {key}, {keys},
    {value}, {name}, {source}, {count}, {index}, {word}."""

    name: str
    separator: str  # between noise-haystack units and task items
    noise: str  # one unit of the noise haystack
    key_list_style: str  # "prose" (a, b, c and d) or "python" (["a", "b", "c", "d"])
    niah_header: str
    niah_needle: str
    niah_query_one: str
    niah_query_values: str
    niah_query_keys: str
    vt_header: str
    vt_value: str
    vt_copy: str
    vt_query: str
    cwe_header: str
    cwe_item: str
    cwe_query: str
    fwe_header: str
    fwe_query: str

    def join_keys(self, keys: list[str]) -> str:
        if self.key_list_style == "python":
            return "[" + ", ".join(f'"{key}"' for key in keys) + "]"
        return ", ".join(keys[:-1]) + " and " + keys[-1] if len(keys) > 1 else keys[0]


NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

TEMPLATES = {
    "text": Template(
        name="text",
        separator=" ",
        noise=NOISE,
        key_list_style="prose",
        niah_header="Some special magic {kinds} are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about the {kinds} afterwards.",
        niah_needle="One of the special magic {kinds} for {key} is: {value}.",
        niah_query_one="What is the special magic {kind} for {key} mentioned in the provided text? "
        "Answer: The special magic {kind} for {key} mentioned in the provided text is",
        niah_query_values="What are all the special magic {kinds} for {key} mentioned in the provided text? "
        "Answer: The special magic {kinds} for {key} mentioned in the provided text are",
        niah_query_keys="What are all the special magic {kinds} for {keys} mentioned in the provided text? "
        "Answer: The special magic {kinds} for {keys} mentioned in the provided text are",
        vt_header="Memorize and track the chain of variable assignments hidden in the following text.",
        vt_value="VAR {name} = {value}.",
        vt_copy="VAR {name} = VAR {source}.",
        vt_query="Question: Find all variables that are assigned the value {value} in the text above. Answer: "
        "According to the chain of variable assignments in the text above, {count} variables are assigned the "
        "value {value}; they are:",
        cwe_header="Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.",
        cwe_item="{index}. {word}",
        cwe_query="Question: What are the {count} most common words in the above list? Answer: The top {count} "
        "words that appear most often in the list are:",
        fwe_header="Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appearing coded words.",
        fwe_query="Question: What are the three most frequently appearing words in the above coded text? Answer: "
        "According to the coded text above, the three most frequently appearing words are:",
    ),
    "code": Template(
        name="code",
        separator="\n",
        noise="# " + NOISE,
        key_list_style="python",
        niah_header="# Special magic {kinds} are hidden in the code below. Remember them: they are asked for at "
        "the end.",
        niah_needle='special_magic_{kind}["{key}"] = {value}',
        niah_query_one='special_magic_{kind}["{key}"] =',
        niah_query_values='# every value assigned to special_magic_{kind}["{key}"] above:\n{kinds} = [',
        niah_query_keys="# the values of special_magic_{kind}[key] for key in {keys}:\n{kinds} = [",
        vt_header="# Track the chain of assignments in the code below.",
        vt_value="{name} = {value}",
        vt_copy="{name} = {source}",
        vt_query="# all {count} names bound to the value {value} above, in order of assignment:\nnames = [",
        cwe_header="# A list of words; some appear more often than others.\nwords = [",
        cwe_item='    "{word}",',
        cwe_query="]\n# the {count} most common entries of words:\nmost_common = [",
        fwe_header='# Coded text: count how often each coded word appears.\ncoded = """',
        fwe_query='"""\n# the three most frequent words in coded:\ntop_three = [',
    ),
}
HAYSTACKS = ("noise", "corpus")
VALUE_KINDS = {"number": ("number", "numbers"), "uuid": ("uuid", "uuids")}


# Samples -------------------------------------------------------------------------------------------
@dataclass
class RulerSample:
    """One prompt. answers: every value the generated text must contain; prompt_tokens: its length in the
    model's tokens (<= length - max_new_tokens)."""

    task: str
    length: int
    index: int
    prompt: str
    answers: list[str]
    max_new_tokens: int
    prompt_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TaskContext:
    """What a task builder needs: its random generators, the template, the haystack and the token budget."""

    rng: random.Random
    np_rng: np.random.Generator
    template: Template
    haystack: "Haystack"
    budget: int
    count_tokens: Callable[[str], int]
    value_kind: str
    task: str
    length: int


@dataclass(frozen=True)
class RulerTask:
    """ordered: the answers have one natural order in which to write them (for the answer loss)."""

    name: str
    category: str
    description: str
    max_new_tokens: int
    build: Callable[[TaskContext], tuple[str, list[str]]]
    ordered: bool


class Haystack:
    """Filler text as a list of units: RULER's noise sentence repeated, or consecutive lines of a corpus
    starting at a random line (wrapping around)."""

    def __init__(self, kind: str, template: Template, rng: random.Random, corpus_lines: list[str] | None = None):
        if kind not in HAYSTACKS:
            raise ValueError(f"unknown haystack {kind!r}; expected one of {list(HAYSTACKS)}")
        self.kind = kind
        if kind == "noise":
            self.separator = template.separator
            self._lines = [template.noise]
            self._start = 0
        else:
            if not corpus_lines:
                raise ValueError("haystack 'corpus' needs corpus text (non-empty lines); give --haystack-data "
                                 "or use --haystack noise")
            self.separator = "\n"
            self._lines = corpus_lines
            self._start = rng.randrange(len(corpus_lines))

    def units(self, count: int) -> list[str]:
        lines = self._lines
        return [lines[(self._start + i) % len(lines)] for i in range(count)]


def corpus_lines(text: str) -> list[str]:
    """The non-blank lines of a corpus text, right-stripped: the units of a 'corpus' haystack."""
    return [line.rstrip() for line in text.splitlines() if line.strip()]


# Helpers --------------------------------------------------------------------------------------------
def sample_seed(seed: int, task: str, length: int, index: int) -> int:
    """A 64-bit seed fixed by (seed, task, length, index), the same on every platform and Python version."""
    digest = hashlib.sha256(f"{seed}/{task}/{length}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def insert_items(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """Units with each item placed before unit round(depth * len(units)) (depth 1.0: after the last one).
    Items at the same place keep their order in `items`."""
    count = len(units)
    placed = sorted(((round(depth * count), order, item) for order, (item, depth) in enumerate(zip(items, depths))))
    out: list[str] = []
    cursor = 0
    for position, _, item in placed:
        out.extend(units[cursor:position])
        cursor = max(cursor, position)
        out.append(item)
    out.extend(units[cursor:])
    return out


def fit_to_budget(render: Callable[[int], tuple[str, list[str]]], ctx: TaskContext,
                  limit: int | None = None) -> tuple[int, str, list[str]]:
    """(n, prompt, answers) for the largest filler count n (<= limit) whose prompt fits ctx.budget tokens.

    Token counts grow with n up to merges across unit boundaries, so an exponential search then a
    binary search finds the boundary; the returned prompt is checked to fit.
    """
    base_prompt, base_answers = render(0)
    base_tokens = ctx.count_tokens(base_prompt)
    if base_tokens > ctx.budget:
        raise ValueError(
            f"task {ctx.task} does not fit in length {ctx.length}: its prompt needs {base_tokens} tokens before any "
            f"filler, and the budget is {ctx.budget} (length minus {ctx.length - ctx.budget} tokens for the answer); "
            "use a longer length"
        )
    limit = limit if limit is not None else 4 * ctx.budget + 16
    low, high = 0, 1
    while high <= limit and ctx.count_tokens(render(high)[0]) <= ctx.budget:
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if ctx.count_tokens(render(middle)[0]) <= ctx.budget:
            low = middle
        else:
            high = middle
    if low == 0:
        return 0, base_prompt, base_answers
    prompt, answers = render(low)
    return low, prompt, answers


def draw_values(ctx: TaskContext, count: int) -> list[str]:
    if ctx.value_kind == "uuid":
        return [str(uuid.UUID(int=ctx.rng.getrandbits(128), version=4)) for _ in range(count)]
    return [str(v) for v in ctx.rng.sample(range(1_000_000, 10_000_000), count)]


def assemble(header: str, body: list[str], separator: str, query: str) -> str:
    return header + "\n" + separator.join(body) + "\n" + query


# Builders -------------------------------------------------------------------------------------------
def _niah(ctx: TaskContext, *, n_keys: int, n_values: int, n_queries: int) -> tuple[str, list[str]]:
    """Needles for n_keys keys (n_values values each); the first n_queries keys are asked for."""
    template = ctx.template
    kind, kinds = VALUE_KINDS[ctx.value_kind]
    keys = key_words(ctx.rng, n_keys)
    values = draw_values(ctx, n_keys * n_values)
    needles, answers = [], []
    for k, key in enumerate(keys):
        for v in range(n_values):
            value = values[k * n_values + v]
            needles.append(template.niah_needle.format(kind=kind, kinds=kinds, key=key, value=value))
            if k < n_queries:
                answers.append(value)
    order = list(range(len(needles)))
    ctx.rng.shuffle(order)
    needles = [needles[i] for i in order]
    depths = [ctx.rng.random() for _ in needles]
    if n_queries > 1:
        query = template.niah_query_keys.format(kind=kind, kinds=kinds, keys=template.join_keys(keys[:n_queries]))
    elif n_values > 1:
        query = template.niah_query_values.format(kind=kind, kinds=kinds, key=keys[0])
    else:
        query = template.niah_query_one.format(kind=kind, kinds=kinds, key=keys[0])
    header = template.niah_header.format(kind=kind, kinds=kinds)

    def render(n: int) -> tuple[str, list[str]]:
        body = insert_items(ctx.haystack.units(n), needles, depths)
        return assemble(header, body, ctx.haystack.separator, query), list(answers)

    return fit_to_budget(render, ctx)[1:]


def build_niah_single(ctx: TaskContext) -> tuple[str, list[str]]:
    return _niah(ctx, n_keys=1, n_values=1, n_queries=1)


def build_niah_multikey(ctx: TaskContext) -> tuple[str, list[str]]:
    return _niah(ctx, n_keys=4, n_values=1, n_queries=1)


def build_niah_multivalue(ctx: TaskContext) -> tuple[str, list[str]]:
    return _niah(ctx, n_keys=1, n_values=4, n_queries=1)


def build_niah_multiquery(ctx: TaskContext) -> tuple[str, list[str]]:
    return _niah(ctx, n_keys=4, n_values=1, n_queries=4)


VT_HOPS = 4


def build_vt(ctx: TaskContext) -> tuple[str, list[str]]:
    """One chain of VT_HOPS + 1 variables: the first holds a 5-digit value, each next one copies the one before."""
    template = ctx.template
    names = variable_names(ctx.rng, VT_HOPS + 1)
    value = str(ctx.rng.randrange(10_000, 100_000))
    statements = [template.vt_value.format(name=names[0], value=value)]
    statements += [template.vt_copy.format(name=names[i], source=names[i - 1]) for i in range(1, len(names))]
    depths = sorted(ctx.rng.random() for _ in statements)
    query = template.vt_query.format(value=value, count=len(names))

    def render(n: int) -> tuple[str, list[str]]:
        body = insert_items(ctx.haystack.units(n), statements, depths)
        return assemble(template.vt_header, body, ctx.haystack.separator, query), list(names)

    return fit_to_budget(render, ctx)[1:]


CWE_COMMON = 10  # RULER: num_cw 10, freq_cw 30, freq_ucw 3
CWE_COMMON_FREQUENCY = 30
CWE_UNCOMMON_FREQUENCY = 3


def build_cwe(ctx: TaskContext) -> tuple[str, list[str]]:
    """A shuffled numbered list: CWE_COMMON words CWE_COMMON_FREQUENCY times each, then as many uncommon
    words (CWE_UNCOMMON_FREQUENCY times each) as fit. Where the full frequency does not fit in half the
    budget (short lengths), the common words appear fewer times, but always more than the uncommon ones."""
    template = ctx.template
    max_uncommon = ctx.budget // CWE_UNCOMMON_FREQUENCY + 1
    words = pseudo_words(ctx.rng, CWE_COMMON + max_uncommon)
    common, uncommon = words[:CWE_COMMON], words[CWE_COMMON:]
    common_keys = ctx.np_rng.random((CWE_COMMON, CWE_COMMON_FREQUENCY))
    uncommon_keys = ctx.np_rng.random((max_uncommon, CWE_UNCOMMON_FREQUENCY))
    query = template.cwe_query.format(count=CWE_COMMON)

    def renderer(frequency: int) -> Callable[[int], tuple[str, list[str]]]:
        def render(n: int) -> tuple[str, list[str]]:
            entries = [w for w in common for _ in range(frequency)] + [w for w in uncommon[:n]
                                                                       for _ in range(CWE_UNCOMMON_FREQUENCY)]
            keys = np.concatenate([common_keys[:, :frequency].ravel(), uncommon_keys[:n].ravel()])
            ordered = [entries[i] for i in np.argsort(keys, kind="stable")]
            body = [template.cwe_item.format(index=i + 1, word=word) for i, word in enumerate(ordered)]
            return assemble(template.cwe_header, body, template.separator, query), list(common)

        return render

    for frequency in range(CWE_COMMON_FREQUENCY, CWE_UNCOMMON_FREQUENCY, -1):
        render = renderer(frequency)
        if ctx.count_tokens(render(0)[0]) <= ctx.budget // 2:
            return fit_to_budget(render, ctx, limit=max_uncommon)[1:]
    smallest = ctx.count_tokens(renderer(CWE_UNCOMMON_FREQUENCY + 1)(0)[0])
    raise ValueError(
        f"task cwe does not fit in length {ctx.length}: its {CWE_COMMON} common words, each listed "
        f"{CWE_UNCOMMON_FREQUENCY + 1} times, take {smallest} tokens, more than half the budget of {ctx.budget}; "
        "use a longer length"
    )


FWE_ALPHA = 2.0  # RULER's default
FWE_VOCABULARY = 500


def build_fwe(ctx: TaskContext) -> tuple[str, list[str]]:
    """Words drawn i.i.d. from a Zipf law over FWE_VOCABULARY coded words; the answer is the three most
    frequent. The text is shortened until the third is strictly more frequent than the fourth."""
    template = ctx.template
    vocabulary = pseudo_words(ctx.rng, FWE_VOCABULARY, syllables=(2,))
    weights = np.arange(1, FWE_VOCABULARY + 1, dtype=np.float64) ** -FWE_ALPHA
    draws = ctx.np_rng.choice(FWE_VOCABULARY, size=ctx.budget + 1, p=weights / weights.sum())
    stream = [vocabulary[i] for i in draws]

    def top_three(n: int) -> tuple[list[str], bool]:
        ranked = Counter(stream[:n]).most_common(4)
        counts = [count for _, count in ranked] + [0] * (4 - len(ranked))
        return [word for word, _ in ranked[:3]], len(ranked) >= 3 and counts[2] > counts[3]

    def render(n: int) -> tuple[str, list[str]]:
        body = [" ".join(stream[:n])]
        return assemble(template.fwe_header, body, template.separator, template.fwe_query), top_three(n)[0]

    n, prompt, answers = fit_to_budget(render, ctx, limit=len(stream))
    while n > 0 and not top_three(n)[1]:
        n -= 1
    if n == 0:
        raise ValueError(f"task fwe does not fit in length {ctx.length}: too few words fit to single out three "
                         "most frequent ones; use a longer length")
    return render(n)


TASKS: dict[str, RulerTask] = {
    task.name: task
    for task in (
        RulerTask("niah_single", "retrieval", "one needle; recall its value", 32, build_niah_single, True),
        RulerTask("niah_multikey", "retrieval", "four keys; recall one key's value", 32, build_niah_multikey, True),
        RulerTask("niah_multivalue", "retrieval", "one key, four values; recall all four", 64, build_niah_multivalue,
                  False),
        RulerTask("niah_multiquery", "retrieval", "four keys; recall all four values", 64, build_niah_multiquery, True),
        RulerTask("vt", "multi-hop", f"variable tracking, one chain of {VT_HOPS} hops", 40, build_vt, True),
        RulerTask("cwe", "aggregation", "the 10 most common words of a list", 120, build_cwe, False),
        RulerTask("fwe", "aggregation", "the 3 most frequent words of Zipf-distributed text", 50, build_fwe, False),
    )
}


def task_names() -> list[str]:
    return list(TASKS)


def resolve_tasks(names: str | list[str] | None) -> list[str]:
    """Task names from a comma-separated string or a list ("all" or None: every task), validated."""
    if names is None or names == "all" or names == ["all"]:
        return task_names()
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown RULER task(s) {unknown or names!r}; valid tasks: {', '.join(TASKS)} (or 'all')")
    return list(dict.fromkeys(names))


def generate_sample(
    task: str,
    *,
    length: int,
    index: int,
    seed: int,
    tokenizer,
    template: str = "text",
    haystack: str = "noise",
    corpus: list[str] | None = None,
    value_kind: str = "number",
) -> RulerSample:
    """Sample `index` of `task` at `length` tokens (prompt + answer room) for `tokenizer` (anything with
    .encode(text) -> ids). corpus: the lines of a 'corpus' haystack (see `corpus_lines`)."""
    if task not in TASKS:
        resolve_tasks([task])
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {list(TEMPLATES)}")
    if value_kind not in VALUE_KINDS:
        raise ValueError(f"unknown value kind {value_kind!r}; expected one of {list(VALUE_KINDS)}")
    spec = TASKS[task]
    budget = length - spec.max_new_tokens
    if budget < 1:
        raise ValueError(f"length {length} leaves no room for the prompt of task {task} "
                         f"(it reserves {spec.max_new_tokens} tokens for the answer)")
    seed_value = sample_seed(seed, task, length, index)
    rng = random.Random(seed_value)
    chosen = TEMPLATES[template]
    ctx = TaskContext(
        rng=rng,
        np_rng=np.random.default_rng(seed_value),
        template=chosen,
        haystack=Haystack(haystack, chosen, rng, corpus),
        budget=budget,
        count_tokens=lambda text: len(tokenizer.encode(text)),
        value_kind=value_kind,
        task=task,
        length=length,
    )
    prompt, answers = spec.build(ctx)
    return RulerSample(task, length, index, prompt, answers, spec.max_new_tokens, ctx.count_tokens(prompt))


def answer_text(answers: list[str]) -> str:
    """The reference continuation scored by the answer loss: " a, b, c"."""
    return " " + ", ".join(answers)


def score_prediction(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all for one sample: the fraction of answers found in the prediction (case-insensitive)."""
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)
