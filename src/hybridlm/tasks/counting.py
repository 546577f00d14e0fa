"""Modular counting and parity: the sum of a sequence modulo m (parity is m = 2 over bits).

Text form (a Python program that runs, with the answer in place):
    xs = [3, 1, 4, 4]
    assert sum(xs) % 5 == 2
or, with labels="prefix", the sum of every prefix:
    assert [sum(xs[:i + 1]) % 5 for i in range(len(xs))] == [3, 4, 3, 2]
(parity names the list `bits`.)

Token form, vocabulary ["<pad>", "=", "0", ..., "m-1"]:
    final:  x1 ... xL = ANSWER      (ANSWER supervised at "=")
    prefix: x1 ... xL               (position t labelled with (x1 + ... + xt) mod m)
"""

from __future__ import annotations

import numpy as np

from hybridlm.tasks.base import Example, Knob, Task, draw

MAX_LENGTH = 1 << 16
LABEL_MODES = ("final", "prefix")


class ModularCounting(Task):
    name = "modular_counting"
    summary = "sum of a sequence of residues modulo m (in TC0; solved by GDN with negative eigenvalues)"
    knob_specs = (
        Knob("length", (3, 40), "number of summed elements", low=1, high=MAX_LENGTH, ranged=True, length=True),
        Knob("modulus", 5, "m: elements and answer are residues 0..m-1", low=2, high=1000),
        Knob("labels", "final", "final: one answer after '='; prefix: the running sum at every position",
             kind=str, choices=LABEL_MODES),
    )
    list_name = "xs"

    @property
    def modulus(self) -> int:
        return self.knobs["modulus"]

    def _vocab_tokens(self) -> list[str]:
        return ["=", *(str(r) for r in range(self.modulus))]

    def sample(self, rng: np.random.Generator) -> Example:
        length = draw(rng, self.knobs["length"])
        values = rng.integers(0, self.modulus, size=length).tolist()
        prefix = np.cumsum(values) % self.modulus
        inputs = [str(v) for v in values]
        listed = f"{self.list_name} = [{', '.join(inputs)}]\n"
        size = {"length": length}
        if self.knobs["labels"] == "final":
            answer = int(prefix[-1])
            prompt = f"{listed}assert sum({self.list_name}) % {self.modulus} =="
            return self._final_example(prompt, str(answer), answer, [*inputs, "="], [str(answer)], size)
        labels = tuple(int(r) for r in prefix)
        name = self.list_name
        prompt = f"{listed}assert [sum({name}[:i + 1]) % {self.modulus} for i in range(len({name}))] =="
        answer_text = f"[{', '.join(map(str, labels))}]"
        return self._tagged_example(prompt, answer_text, labels, inputs, [str(r) for r in labels], size)

    def reference_solve(self, example: Example) -> int | tuple[int, ...]:
        if self.knobs["labels"] == "final":
            tokens = self._prompt_tokens(example)
            if tokens[-1] != "=":
                raise ValueError(f"expected the prompt tokens to end with '='; got {tokens[-3:]}")
            return sum(int(token) for token in tokens[:-1]) % self.modulus
        running, labels = 0, []
        for token in self.decode(example.input_ids):
            running = (running + int(token)) % self.modulus
            labels.append(running)
        return tuple(labels)


class Parity(ModularCounting):
    name = "parity"
    summary = "parity of a bit string (modular counting with m = 2); needs negative eigenvalues in linear RNNs"
    knob_specs = (
        Knob("length", (3, 40), "number of bits", low=1, high=MAX_LENGTH, ranged=True, length=True),
        Knob("labels", "final", "final: one answer after '='; prefix: the parity of every prefix",
             kind=str, choices=LABEL_MODES),
    )
    list_name = "bits"

    @property
    def modulus(self) -> int:
        return 2
