"""What every task shares: knobs, the token vocabulary, the example record and the `Task` base class.

A task draws examples from a seeded `numpy.random.Generator` (numpy's generators are bit-for-bit the same
on every platform, so a seed names the same examples everywhere for a given numpy version; the seed is
salted with the task name, so two tasks with one seed draw unrelated examples). Each example
has two forms:

- text: code-like, for people and for pretrained language models: `f"{prompt} {answer_text}"`.
- tokens: `input_ids` over the task's own small vocabulary (PAD = 0), with `targets` of the same length.
  `targets[t]` is the token to predict after reading `input_ids[: t + 1]`, or IGNORE_INDEX (-100) where
  nothing is supervised. Two shapes occur:
    * final answer: the answer tokens are appended to the input (teacher forcing), so at a supervised
      position `targets[t] == input_ids[t + 1]`; the last position is unsupervised.
    * per-position labels (tagging, e.g. running products, MQAR queries): the label is predicted at the
      position that completes its prefix; the labels are tokens of the same vocabulary but need not occur
      in the input.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np

PAD_TOKEN = "<pad>"
PAD_ID = 0
IGNORE_INDEX = -100

Range = tuple[int, int]


# Knobs ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Knob:
    """One setting of a task: its default, its valid values and whether it is a size knob.

    kind: int, float or str (a choice among `choices`).
    ranged: an int knob that also takes an inclusive range `lo:hi` (or a (lo, hi) pair); each example
        then draws its own value uniformly from the range. Ranged knobs are stored as (lo, hi) tuples.
    length: a size knob that a longer-than-training test split grows (see `hybridlm.tasks.splits`).
    """

    name: str
    default: Any
    help: str
    kind: type = int
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    ranged: bool = False
    length: bool = False

    def valid_values(self) -> str:
        """The valid values in words, for error messages and `hybridlm tasks list`."""
        if self.kind is str:
            return "one of " + ", ".join(self.choices or ())
        if self.kind is float:
            return f"a number in [{self.low:g}, {self.high:g}]"
        text = f"an integer in [{self.low}, {self.high}]"
        return text + " or a range lo:hi inside it" if self.ranged else text

    def format(self, value: Any) -> str:
        """The value as `--set` would take it (a range as lo:hi)."""
        if isinstance(value, tuple):
            return str(value[0]) if value[0] == value[1] else f"{value[0]}:{value[1]}"
        return f"{value:g}" if isinstance(value, float) else str(value)

    def parse(self, text: str) -> Any:
        """The value of a command-line string (`16`, `16:32`, `0.5`, `swap`), validated."""
        text = text.strip()
        if self.kind is str:
            return self.normalize(text)
        try:
            if self.kind is float:
                value: Any = float(text)
            elif self.ranged and ":" in text:
                low, high = text.split(":")
                value = (int(low), int(high))
            else:
                value = int(text)
        except ValueError:
            raise ValueError(f"knob {self.name}={text!r} is invalid: expected {self.valid_values()}") from None
        return self.normalize(value)

    def normalize(self, value: Any) -> Any:
        """Check `value` and put it in canonical form (ranged knobs become (lo, hi) tuples)."""
        problem = f"knob {self.name}={value!r} is invalid: expected {self.valid_values()}"
        if self.kind is str:
            if value not in (self.choices or ()):
                raise ValueError(problem)
            return value
        if self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
                raise ValueError(problem)
            return float(value)
        if isinstance(value, str) and self.ranged:
            return self.parse(value)
        if self.ranged and isinstance(value, (tuple, list)) and len(value) == 2:
            low, high = value
        else:
            low = high = value
        for bound in (low, high):
            if isinstance(bound, (bool, np.bool_)) or not isinstance(bound, (int, np.integer)):
                raise ValueError(problem)
        low, high = int(low), int(high)
        if not (self.low <= low <= high <= self.high):
            raise ValueError(problem + ("" if low <= high else " (lo must not exceed hi)"))
        return (low, high) if self.ranged else low


def draw(rng: np.random.Generator, bounds: Range) -> int:
    """A uniform integer in the inclusive range `bounds`."""
    return int(rng.integers(bounds[0], bounds[1] + 1))


# Vocabulary -----------------------------------------------------------------------------------------------
class Vocabulary:
    """A task's token strings; the id of a token is its index. Id 0 is always PAD ("<pad>")."""

    def __init__(self, tokens: Iterable[str]):
        self.tokens: tuple[str, ...] = (PAD_TOKEN, *tokens)
        self._ids = {token: index for index, token in enumerate(self.tokens)}
        if len(self._ids) != len(self.tokens):
            duplicates = sorted({t for t in self.tokens if self.tokens.count(t) > 1})
            raise ValueError(f"vocabulary tokens must be unique; repeated: {duplicates}")

    pad_id = PAD_ID

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __hash__(self) -> int:
        return hash(self.tokens)

    def __repr__(self) -> str:
        head = ", ".join(repr(t) for t in self.tokens[:8])
        return f"Vocabulary({len(self)} tokens: {head}{', ...' if len(self) > 8 else ''})"

    def _unknown(self, token: str) -> ValueError:
        return ValueError(f"token {token!r} is not in this vocabulary ({len(self)} tokens, "
                          f"e.g. {list(self.tokens[:10])})")

    def id(self, token: str) -> int:
        try:
            return self._ids[token]
        except KeyError:
            raise self._unknown(token) from None

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token strings -> ids."""
        ids = self._ids
        try:
            return [ids[token] for token in tokens]
        except KeyError as error:
            raise self._unknown(error.args[0]) from None

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Ids -> token strings."""
        tokens = self.tokens
        out = []
        for index in ids:
            index = int(index)
            if not 0 <= index < len(tokens):
                raise ValueError(f"token id {index} is outside this vocabulary (valid ids: 0..{len(tokens) - 1})")
            out.append(tokens[index])
        return out


# Code-like text <-> tokens --------------------------------------------------------------------------------
# Newline, `==`, integers, names, and single punctuation marks; other whitespace separates tokens.
_CODE_TOKEN = re.compile(r"\n|==|\d+|[A-Za-z_]\w*|[^\s\w]")


def code_tokens(text: str) -> list[str]:
    """Split code-like text into tokens: an integer literal is one token, spaces are dropped, newlines kept.

    >>> code_tokens("a, c = c, a\\nassert bits[a] == 1")
    ['a', ',', 'c', '=', 'c', ',', 'a', '\\n', 'assert', 'bits', '[', 'a', ']', '==', '1']
    """
    return _CODE_TOKEN.findall(text)


def show_tokens(tokens: Sequence[str]) -> str:
    """Tokens on one line, separated by spaces, with newlines shown as \\n."""
    return " ".join("\\n" if token == "\n" else token for token in tokens)


# Examples -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One task instance in both forms.

    prompt: code-like text up to where the answer starts; the full text is `f"{prompt} {answer_text}"`.
    answer_text: the answer as text (for per-position labels, a list of them).
    answer: the exact answer: an int or bool, or a tuple of ints for per-position labels.
    input_ids: token ids (list of int, no padding), including teacher-forced answer tokens for
        final-answer tasks.
    targets: same length as input_ids; the token to predict after `input_ids[: t + 1]`, or -100.
    size: the sizes this example was drawn with (e.g. {"m": 20, "n": 7}), keyed like the task's knobs.
    """

    prompt: str
    answer_text: str
    answer: Any
    input_ids: list[int]
    targets: list[int]
    size: dict[str, int] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer_text}"

    @property
    def supervised_positions(self) -> list[int]:
        return [t for t, target in enumerate(self.targets) if target != IGNORE_INDEX]

    def __len__(self) -> int:
        return len(self.input_ids)


# Tasks ----------------------------------------------------------------------------------------------------
class Task:
    """Base class: knob validation, vocabulary, seeded sampling and example assembly.

    A subclass sets `name`, `summary` and `knob_specs`, and implements `_vocab_tokens()` (the token strings
    after PAD), `sample(rng)` and `reference_solve(example)`; it may add cross-knob checks in `_check_knobs`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    knob_specs: ClassVar[tuple[Knob, ...]]

    def __init__(self, **knobs: Any):
        specs = {spec.name: spec for spec in self.knob_specs}
        unknown = sorted(set(knobs) - set(specs))
        if unknown:
            raise ValueError(
                f"task {self.name!r} has no knob {', '.join(unknown)}; its knobs are: {', '.join(specs)}"
            )
        self.knobs: dict[str, Any] = {
            name: spec.normalize(knobs.get(name, spec.default)) for name, spec in specs.items()
        }
        self._check_knobs()
        self.vocab = Vocabulary(self._vocab_tokens())

    # To implement ---------------------------------------------------------------------------------------
    def _check_knobs(self) -> None:
        """Raise ValueError for knob combinations that cannot be sampled."""

    def _vocab_tokens(self) -> list[str]:
        raise NotImplementedError

    def sample(self, rng: np.random.Generator) -> Example:
        """One example drawn with `rng`."""
        raise NotImplementedError

    def reference_solve(self, example: Example) -> Any:
        """The answer computed from the example's tokens alone (and which positions are supervised),
        without the generator's bookkeeping; equals `example.answer`."""
        raise NotImplementedError

    # Shared -----------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        specs = {spec.name: spec for spec in self.knob_specs}
        settings = ", ".join(f"{name}={specs[name].format(value)}" for name, value in self.knobs.items())
        return f"{type(self).__name__}({settings})"

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return self.vocab.encode(tokens)

    def decode(self, ids: Sequence[int]) -> list[str]:
        return self.vocab.decode(ids)

    def rng(self, seed: int, *stream: int) -> np.random.Generator:
        """The generator for `seed` (and an optional stream number), salted with the task name so that
        different tasks with one seed draw unrelated examples."""
        for value in (seed, *stream):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"seeds and stream numbers must be non-negative integers; got {value!r}")
        return np.random.default_rng([zlib.crc32(self.name.encode()), int(seed), *map(int, stream)])

    def dataset(self, n: int, seed: int | np.random.Generator) -> list[Example]:
        """`n` examples drawn from `self.rng(seed)`, or from a given Generator."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative number of examples; got {n!r}")
        rng = seed if isinstance(seed, np.random.Generator) else self.rng(seed)
        return [self.sample(rng) for _ in range(n)]

    @classmethod
    def knob(cls, name: str) -> Knob:
        for spec in cls.knob_specs:
            if spec.name == name:
                return spec
        raise ValueError(f"task {cls.name!r} has no knob {name!r}; its knobs are: "
                         f"{', '.join(s.name for s in cls.knob_specs)}")

    def _final_example(
        self,
        prompt: str,
        answer_text: str,
        answer: Any,
        prompt_tokens: Sequence[str],
        answer_tokens: Sequence[str],
        size: dict[str, int],
    ) -> Example:
        """An example whose answer tokens follow the prompt and are supervised (next-token convention)."""
        input_ids = self.vocab.encode([*prompt_tokens, *answer_tokens])
        targets = [IGNORE_INDEX] * len(input_ids)
        start = len(prompt_tokens)
        for offset in range(len(answer_tokens)):
            targets[start - 1 + offset] = input_ids[start + offset]
        return Example(prompt, answer_text, answer, input_ids, targets, size)

    def _tagged_example(
        self,
        prompt: str,
        answer_text: str,
        answer: Any,
        input_tokens: Sequence[str],
        label_tokens: Sequence[str | None],
        size: dict[str, int],
    ) -> Example:
        """An example with a label token (or None: unsupervised) for each input position."""
        input_ids = self.vocab.encode(input_tokens)
        ids = self.vocab._ids
        targets = [IGNORE_INDEX if label is None else ids[label] for label in label_tokens]
        return Example(prompt, answer_text, answer, input_ids, targets, size)

    def _prompt_tokens(self, example: Example) -> list[str]:
        """For a final-answer example: the tokens before the first answer token."""
        positions = example.supervised_positions
        if not positions:
            raise ValueError("the example has no supervised position, so its answer cannot be located")
        return self.decode(example.input_ids[: positions[0] + 1])
