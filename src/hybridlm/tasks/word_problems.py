"""Group word problems (Merrill, Petty & Sabharwal 2024): the running product of a sequence of group elements.

Over S5 or A5 the problem is NC1-complete, so fixed-depth transformers cannot solve it at every length
(if TC0 != NC1), while one GDN layer with negative eigenvalues can. A4xZ5 and Z60 (same order as A5,
solvable) are the TC0 controls. See `hybridlm.tasks.groups` for the element order and names.

Text form (products read left to right, the left factor acting first):
    group = 'S5'
    word = ['10234', '21034', '01243']
    assert product(word) == '20143'
or, with labels="prefix":
    assert running_products(word) == ['10234', '02134', '02143']

Token form, vocabulary ["<pad>", "=", element names in canonical order] (so element index i has token id i + 2):
    prefix: x1 ... xL               (position t labelled with x1 * ... * xt)   [the default: token tagging]
    final:  x1 ... xL = PRODUCT     (PRODUCT supervised at "=")
"""

from __future__ import annotations

import numpy as np

from hybridlm.tasks.base import Example, Knob, Task, draw
from hybridlm.tasks.groups import GROUP_NAMES, Group, get_group

MAX_LENGTH = 1 << 16


class WordProblem(Task):
    name = "word_problem"
    summary = "running product of group elements; S5/A5 are NC1-complete, A4xZ5/Z60 are solvable controls"
    knob_specs = (
        Knob("group", "S5", "the group: S5, A5 (NC1-complete) or A4xZ5, Z60 (solvable, TC0)",
             kind=str, choices=GROUP_NAMES),
        Knob("length", (2, 16), "number of group elements in the word", low=1, high=MAX_LENGTH, ranged=True,
             length=True),
        Knob("labels", "prefix", "prefix: the running product at every position; final: one product after '='",
             kind=str, choices=("prefix", "final")),
    )

    @property
    def group(self) -> Group:
        return get_group(self.knobs["group"])

    def _vocab_tokens(self) -> list[str]:
        return ["=", *self.group.names]

    def sample(self, rng: np.random.Generator) -> Example:
        group = self.group
        length = draw(rng, self.knobs["length"])
        word = rng.integers(0, group.order, size=length).tolist()
        running = []
        product = 0
        for element in word:
            product = int(group.table[product, element])
            running.append(product)
        names = [group.names[i] for i in word]
        prompt_head = f"group = {group.name!r}\nword = [{', '.join(repr(n) for n in names)}]\n"
        size = {"length": length}
        if self.knobs["labels"] == "final":
            answer = running[-1]
            prompt = prompt_head + "assert product(word) =="
            return self._final_example(prompt, repr(group.names[answer]), answer, [*names, "="],
                                       [group.names[answer]], size)
        labels = tuple(running)
        prompt = prompt_head + "assert running_products(word) =="
        answer_text = f"[{', '.join(repr(group.names[i]) for i in labels)}]"
        return self._tagged_example(prompt, answer_text, labels, names, [group.names[i] for i in labels], size)

    def reference_solve(self, example: Example) -> int | tuple[int, ...]:
        """Multiply the elements read from their token names, without the Cayley table."""
        final = self.knobs["labels"] == "final"
        tokens = self._prompt_tokens(example)[:-1] if final else self.decode(example.input_ids)
        group_name = self.knobs["group"]
        running, products = None, []
        for token in tokens:
            element = _parse_element(group_name, token)
            running = element if running is None else _multiply(group_name, running, element)
            products.append(self.group.names.index(_format_element(group_name, running)))
        return products[-1] if final else tuple(products)


# Reference arithmetic on element names, independent of groups.py's tables.
def _parse_element(group_name: str, token: str):
    if group_name in ("S5", "A5"):
        return tuple(int(c) for c in token)
    if group_name == "A4xZ5":
        a4, z = token.strip("()").split(",")
        return tuple(int(c) for c in a4), int(z)
    return int(token)


def _multiply(group_name: str, left, right):
    if group_name in ("S5", "A5"):
        return tuple(right[left[i]] for i in range(5))
    if group_name == "A4xZ5":
        return tuple(right[0][left[0][i]] for i in range(4)), (left[1] + right[1]) % 5
    return (left + right) % 60


def _format_element(group_name: str, element) -> str:
    if group_name in ("S5", "A5"):
        return "".join(map(str, element))
    if group_name == "A4xZ5":
        return f"({''.join(map(str, element[0]))},{element[1]})"
    return str(element)
