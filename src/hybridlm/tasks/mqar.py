"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023, arXiv 2312.04927).

A context of P key-value pairs, then a query region in which each key is asked once; the model must emit
the key's value at the query position. As in Zoology: keys and values come from disjoint halves of the
vocabulary, are distinct within an example, queries sit at even offsets of the query region with a
power-law preference for short gaps (power_a; 1.0 is uniform), and the other query-region positions hold
random key/value tokens (fill=random) or a blank token (fill=blank).

Token form, vocabulary ["<pad>", "_", "k0", ..., "k{K-1}", "v0", ..., "v{V-1}"] with K + V = vocab_size - 2:
    k3 v7 k12 v1 ... (2P context tokens)  then seq_len - 2P query-region tokens
    targets: the queried key's value at each query position, -100 elsewhere.

Text form: the context on one line, the query region on the next with queries marked by "?"
(the marks and the last line are not tokens), then the values in query order:
    k3 v7 k12 v1
    k12? v5 k3? k40
    answers = v1 v7
"""

from __future__ import annotations

import numpy as np

from hybridlm.tasks.base import Example, Knob, Task, draw

BLANK = "_"


class MultiQueryRecall(Task):
    name = "mqar"
    summary = "multi-query associative recall (Zoology): P key-value pairs, then each key is queried"
    knob_specs = (
        Knob("num_pairs", 8, "P: key-value pairs in the context (each is queried once)", low=1, high=1 << 14,
             ranged=True, length=True),
        Knob("seq_len", 64, "tokens per example (context 2P + query region); at least 4P", low=4, high=1 << 17,
             ranged=True, length=True),
        Knob("vocab_size", 8192, "tokens in the vocabulary, PAD and blank included; keys take half of the rest",
             low=4, high=1 << 20),
        Knob("power_a", 0.01, "query gap distribution p(gap slot i) ~ i^(a-1); 1.0 is uniform", kind=float,
             low=1e-6, high=1.0),
        Knob("fill", "random", "non-query positions of the query region: random key/value tokens or blank '_'",
             kind=str, choices=("random", "blank")),
    )

    @property
    def num_keys(self) -> int:
        return (self.knobs["vocab_size"] - 2) // 2

    @property
    def num_values(self) -> int:
        return self.knobs["vocab_size"] - 2 - self.num_keys

    def _check_knobs(self) -> None:
        pairs_high = self.knobs["num_pairs"][1]
        seq_high = self.knobs["seq_len"][1]
        if pairs_high > min(self.num_keys, self.num_values):
            smallest = 2 * pairs_high + 2
            raise ValueError(
                f"vocab_size={self.knobs['vocab_size']} gives {self.num_keys} keys and {self.num_values} values, "
                f"too few for {pairs_high} distinct pairs; need num_pairs <= {min(self.num_keys, self.num_values)} "
                f"or vocab_size >= {smallest}"
            )
        if seq_high < 4 * pairs_high:
            raise ValueError(
                f"seq_len up to {seq_high} cannot hold {pairs_high} pairs plus their queries; need the largest "
                f"seq_len >= 4 * num_pairs = {4 * pairs_high} (or fewer pairs)"
            )

    def _vocab_tokens(self) -> list[str]:
        return [BLANK, *(f"k{i}" for i in range(self.num_keys)), *(f"v{i}" for i in range(self.num_values))]

    def sample(self, rng: np.random.Generator) -> Example:
        pairs = draw(rng, self.knobs["num_pairs"])
        seq_low, seq_high = self.knobs["seq_len"]
        seq_len = draw(rng, (max(seq_low, 4 * pairs), seq_high))
        keys = rng.choice(self.num_keys, size=pairs, replace=False)
        values = rng.choice(self.num_values, size=pairs, replace=False)

        region = seq_len - 2 * pairs
        slots = region // 2
        weights = self.knobs["power_a"] * np.arange(1, slots + 1, dtype=np.float64) ** (self.knobs["power_a"] - 1)
        gaps = rng.choice(slots, size=pairs, replace=False, p=weights / weights.sum())
        if self.knobs["fill"] == "random":
            filler_ids = rng.integers(0, self.num_keys + self.num_values, size=region)
            filler = [f"k{i}" if i < self.num_keys else f"v{i - self.num_keys}" for i in filler_ids.tolist()]
        else:
            filler = [BLANK] * region

        context = [token for k, v in zip(keys.tolist(), values.tolist()) for token in (f"k{k}", f"v{v}")]
        query_region = list(filler)
        labels: list[str | None] = [None] * seq_len
        query_order = np.argsort(gaps)  # pairs in the order their queries appear
        for pair in query_order.tolist():
            offset = 2 * int(gaps[pair])
            query_region[offset] = f"k{keys[pair]}"
            labels[2 * pairs + offset] = f"v{values[pair]}"
        marked = list(query_region)
        for pair in query_order.tolist():
            marked[2 * int(gaps[pair])] += "?"
        answer = tuple(int(values[pair]) for pair in query_order.tolist())
        prompt = " ".join(context) + "\n" + " ".join(marked) + "\nanswers ="
        answer_text = " ".join(f"v{v}" for v in answer)
        return self._tagged_example(prompt, answer_text, answer, context + query_region, labels,
                                    {"num_pairs": pairs, "seq_len": seq_len})

    def reference_solve(self, example: Example) -> tuple[int, ...]:
        """Each supervised position holds a key; its value is the token after the key's first occurrence
        (the context comes first and holds each key once)."""
        tokens = self.decode(example.input_ids)
        answer = []
        for position in example.supervised_positions:
            first = tokens.index(tokens[position])
            answer.append(int(tokens[first + 1][1:]))
        return tuple(answer)
