"""Boolean formula evaluation (NC1-complete, Buss 1987): and/or/not over the constants True and False.

Padded transformers stay in TC0, while padded hybrids capture NC1 (paper §3.4); `padding` adds p blank
tokens "." between the formula and the answer, the extra steps the padded constructions use.

Text form (Python; without padding the program runs, with the answer in place):
    assert (True and not (False or True)) == False
    assert (True and not (False or True)) . . . . == False      (padding=4)
Every and/or node is parenthesized, so the Python reading is the tree's reading; `not` applies to one
constant or one parenthesized node and never repeats.

Random formulas of exact nesting depth d (count of and/or levels): a node of depth d > 0 is and/or with
equal chance; one child (either side) has depth d - 1, the other a uniform depth in [0, d - 1]; any node is
negated with probability not_prob. Depth 0 is a single constant.

Token form, vocabulary ["<pad>", "assert", "(", ")", "True", "False", "and", "or", "not", ".", "=="]:
the text split by `code_tokens`, then the answer token True/False, supervised at "==".
"""

from __future__ import annotations

import numpy as np

from hybridlm.tasks.base import Example, Knob, Task, code_tokens, draw

MAX_DEPTH = 24


class BooleanFormula(Task):
    name = "boolean_formula"
    summary = "evaluate a random and/or/not formula over True/False (NC1-complete), optional padding"
    knob_specs = (
        Knob("depth", (1, 4), "nesting depth of and/or operators (0: a single constant)", low=0, high=MAX_DEPTH,
             ranged=True, length=True),
        Knob("not_prob", 0.3, "probability that a node is negated", kind=float, low=0.0, high=1.0),
        Knob("padding", 0, "p: blank '.' tokens between the formula and the answer", low=0, high=1 << 16,
             ranged=True),
    )

    def _vocab_tokens(self) -> list[str]:
        return ["assert", "(", ")", "True", "False", "and", "or", "not", ".", "=="]

    def _formula(self, rng: np.random.Generator, depth: int) -> tuple[str, bool, int]:
        """(text, value, number of constants) of a random formula of exactly this depth."""
        if depth == 0:
            value = bool(rng.integers(2))
            text, leaves = str(value), 1
        else:
            operator = "and" if rng.integers(2) == 0 else "or"
            depths = [depth - 1, int(rng.integers(depth))]
            if rng.integers(2):
                depths.reverse()
            (left, left_value, left_leaves), (right, right_value, right_leaves) = (
                self._formula(rng, d) for d in depths
            )
            value = (left_value and right_value) if operator == "and" else (left_value or right_value)
            text, leaves = f"({left} {operator} {right})", left_leaves + right_leaves
        if rng.random() < self.knobs["not_prob"]:
            return f"not {text}", not value, leaves
        return text, value, leaves

    def sample(self, rng: np.random.Generator) -> Example:
        depth = draw(rng, self.knobs["depth"])
        padding = draw(rng, self.knobs["padding"])
        formula, value, leaves = self._formula(rng, depth)
        prompt = f"assert {formula}{' .' * padding} =="
        return self._final_example(prompt, str(value), value, code_tokens(prompt), [str(value)],
                                   {"depth": depth, "padding": padding, "leaves": leaves})

    def reference_solve(self, example: Example) -> bool:
        """Evaluate the formula tokens with a recursive-descent reader of its own."""
        tokens = self._prompt_tokens(example)
        position = 1  # after "assert"

        def read() -> bool:
            nonlocal position
            token = tokens[position]
            position += 1
            if token == "not":
                return not read()
            if token in ("True", "False"):
                return token == "True"
            if token != "(":
                raise ValueError(f"unexpected token {token!r} at position {position - 1} of the formula")
            left = read()
            operator = tokens[position]
            if operator not in ("and", "or"):
                raise ValueError(f"expected 'and' or 'or' at position {position}; got {operator!r}")
            position += 1
            right = read()
            if tokens[position] != ")":
                raise ValueError(f"expected ')' at position {position}; got {tokens[position]!r}")
            position += 1
            return (left and right) if operator == "and" else (left or right)

        value = read()
        rest = tokens[position:]
        if rest[-1] != "==" or any(token != "." for token in rest[:-1]):
            raise ValueError(f"expected padding dots and '==' after the formula; got {rest[:5]}...")
        return value
