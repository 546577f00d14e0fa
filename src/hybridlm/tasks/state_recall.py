"""State-based recall (Olmo Hybrid paper, §3.3 / Fig. 5) and its two halves, as short Python programs.

state_recall: a list of m bits, k pointer variables holding distinct indices, n lines of simultaneous
assignments that permute the pointers' values, then a query through a pointer:
    bits = [0, 1, 1, 0, 1, 0, 0, 1]
    a, b, c, d, e = 3, 0, 7, 1, 6
    a, c = c, a
    b, d, e = e, b, d
    assert bits[a] == 1
Tracking the pointers is a permutation word problem (NC1-hard), reading the bit needs recall of the whole
list; the paper proves a single GDN -> attention alternation solves it while neither pure family can.

state_tracking (the tracking half): the same program without the bit list, asking a pointer's value:
    a, b, c, d, e = 3, 0, 7, 1, 6
    a, c = c, a
    assert a == 7
bit_recall (the recall half): the bit list and a literal index:
    bits = [0, 1, 1, 0, 1, 0, 0, 1]
    assert bits[5] == 0

Lines: mode=swap writes `x, y = y, x` (two pointers); mode=permute picks 2..k pointers and assigns them a
random non-identity permutation of their own values (`a, c, e = c, e, a`). Either way the pointers always hold
distinct indices in [0, m - 1]. Pointer names are the first k letters a, b, c, ...

Token form: the program split by `code_tokens` (an integer is ONE token; spaces dropped, newlines kept),
then the answer token. The vocabulary is shared by all three tasks for equal max_bits:
    ["<pad>", "\\n", "=", "==", ",", "[", "]", "bits", "assert", "a", ..., "z", "0", ..., str(max_bits - 1)]
so index i has token id 35 + i (bits 0/1 are the index tokens "0"/"1"). The answer follows "==" and is
supervised there. In state_recall / bit_recall, bit i of the list sits at token position 3 + 2 i.
"""

from __future__ import annotations

import string

import numpy as np

from hybridlm.tasks.base import Example, Knob, Task, code_tokens, draw

POINTER_NAMES = string.ascii_lowercase
PUNCTUATION = ["\n", "=", "==", ",", "[", "]", "bits", "assert"]
MAX_BITS = 1 << 14
MAX_LINES = 1 << 16
MODES = ("swap", "permute")


def _bits_knob(default=(16, 32)) -> Knob:
    return Knob("m", default, "number of bits in the list (pointer values are indices in [0, m-1])", low=1,
                high=MAX_BITS, ranged=True, length=True)


POINTERS_KNOB = Knob("k", 5, "number of pointer variables (named a, b, c, ...)", low=1, high=len(POINTER_NAMES))
LINES_KNOB = Knob("n", (4, 16), "number of assignment lines", low=0, high=MAX_LINES, ranged=True, length=True)
MODE_KNOB = Knob("mode", "swap", "swap: `x, y = y, x` lines; permute: 2..k pointers permute their values",
                 kind=str, choices=MODES)
MAX_BITS_KNOB = Knob("max_bits", 128, "index tokens 0..max_bits-1 in the vocabulary (keep equal to share a "
                     "model across the three tasks and splits); must be >= m", low=2, high=MAX_BITS)


class _PointerProgram(Task):
    """Shared vocabulary, knob checks, program lines and the reference interpreter."""

    def _vocab_tokens(self) -> list[str]:
        return [*PUNCTUATION, *POINTER_NAMES, *(str(i) for i in range(self.knobs["max_bits"]))]

    def _check_knobs(self) -> None:
        m_low, m_high = self.knobs["m"]
        if m_high > self.knobs["max_bits"]:
            raise ValueError(
                f"m up to {m_high} needs index tokens up to {m_high - 1}, but max_bits={self.knobs['max_bits']}; "
                f"raise max_bits to at least {m_high} (valid: 2..{MAX_BITS})"
            )
        if "k" not in self.knobs:
            return
        k = self.knobs["k"]
        if k > m_low:
            raise ValueError(
                f"k={k} pointers need {k} distinct indices, but m can be as small as {m_low}; need k <= smallest m "
                f"(valid k: 1..{min(m_low, len(POINTER_NAMES))} for this m)"
            )
        if k < 2 and self.knobs["n"][1] > 0:
            raise ValueError(f"assignment lines permute at least 2 pointers, so k must be >= 2 when n > 0 "
                             f"(got k={k}, n up to {self.knobs['n'][1]}); valid k: 2..{min(m_low, 26)}")

    def _bits_line(self, bits: list[int]) -> str:
        return f"bits = [{', '.join(map(str, bits))}]\n"

    def _pointer_lines(self, rng: np.random.Generator, m: int) -> tuple[str, list[int], int]:
        """The initialization and n assignment lines; returns (text, final pointer values, n)."""
        k = self.knobs["k"]
        names = POINTER_NAMES[:k]
        values = rng.choice(m, size=k, replace=False).tolist()
        lines = [f"{', '.join(names)} = {', '.join(map(str, values))}"]
        n = draw(rng, self.knobs["n"])
        if self.knobs["mode"] == "swap":  # two distinct pointers per line, drawn for all lines at once
            firsts = rng.integers(k, size=n)
            seconds = rng.integers(max(k - 1, 1), size=n)  # k >= 2 whenever n > 0 (see _check_knobs)
            seconds = seconds + (seconds >= firsts)
            pairs = np.sort(np.stack([firsts, seconds], axis=1), axis=1).tolist()
        for line in range(n):
            if self.knobs["mode"] == "swap":
                left = pairs[line]
                right = left[::-1]
            else:
                width = draw(rng, (2, k))
                left = sorted(rng.choice(k, size=width, replace=False).tolist())
                right = left
                while right == left:
                    right = [left[i] for i in rng.permutation(width).tolist()]
            old = list(values)
            for target, source in zip(left, right):
                values[target] = old[source]
            lines.append(f"{', '.join(names[i] for i in left)} = {', '.join(names[i] for i in right)}")
        return "\n".join(lines) + "\n", values, n

    def reference_solve(self, example: Example) -> int:
        """Run the program's tokens with a small interpreter of its own (no generator state)."""
        tokens = self._prompt_tokens(example)
        env: dict[str, int] = {}
        bits: list[int] = []
        lines, line = [], []
        for token in tokens:
            if token == "\n":
                lines.append(line)
                line = []
            else:
                line.append(token)
        lines.append(line)

        def value(expression: list[str]) -> int:
            if expression[0] == "bits":  # bits [ X ]
                return bits[value(expression[2:-1])]
            token = expression[0]
            return int(token) if token.isdigit() else env[token]

        for line in lines:
            if line[0] == "bits":
                bits = [int(t) for t in line[3:-1:2]]
            elif line[0] == "assert":
                return value(line[1:line.index("==")])
            else:
                split = line.index("=")
                targets = line[:split:2]
                new_values = [value([t]) for t in line[split + 1::2]]
                env.update(zip(targets, new_values))
        raise ValueError("the program has no `assert` line")


class StateBasedRecall(_PointerProgram):
    name = "state_recall"
    summary = "bits list + pointer swaps + `assert bits[a] ==`: tracking and recall together (paper Theorem 1)"
    knob_specs = (_bits_knob(), POINTERS_KNOB, LINES_KNOB, MODE_KNOB, MAX_BITS_KNOB)

    def sample(self, rng: np.random.Generator) -> Example:
        m = draw(rng, self.knobs["m"])
        bits = rng.integers(0, 2, size=m).tolist()
        pointer_text, values, n = self._pointer_lines(rng, m)
        query = int(rng.integers(self.knobs["k"]))
        answer = bits[values[query]]
        prompt = f"{self._bits_line(bits)}{pointer_text}assert bits[{POINTER_NAMES[query]}] =="
        return self._final_example(prompt, str(answer), answer, code_tokens(prompt), [str(answer)], {"m": m, "n": n})


class StateTracking(_PointerProgram):
    name = "state_tracking"
    summary = "pointer swaps + `assert a ==`: the tracking half of state_recall (answer: an index)"
    knob_specs = (_bits_knob(), POINTERS_KNOB, LINES_KNOB, MODE_KNOB, MAX_BITS_KNOB)

    def sample(self, rng: np.random.Generator) -> Example:
        m = draw(rng, self.knobs["m"])
        pointer_text, values, n = self._pointer_lines(rng, m)
        query = int(rng.integers(self.knobs["k"]))
        answer = values[query]
        prompt = f"{pointer_text}assert {POINTER_NAMES[query]} =="
        return self._final_example(prompt, str(answer), answer, code_tokens(prompt), [str(answer)], {"m": m, "n": n})


class BitRecall(_PointerProgram):
    name = "bit_recall"
    summary = "bits list + `assert bits[i] ==` for a literal i: the recall half of state_recall"
    knob_specs = (_bits_knob(), MAX_BITS_KNOB)

    def sample(self, rng: np.random.Generator) -> Example:
        m = draw(rng, self.knobs["m"])
        bits = rng.integers(0, 2, size=m).tolist()
        index = int(rng.integers(m))
        answer = bits[index]
        prompt = f"{self._bits_line(bits)}assert bits[{index}] =="
        return self._final_example(prompt, str(answer), answer, code_tokens(prompt), [str(answer)], {"m": m})
