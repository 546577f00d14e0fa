"""The pointer-program vocabulary (state_recall, state_tracking, bit_recall) as residual features, and the
index code shared by the constructions (b), (c) and (d).

Index code (a residue code). With pairwise coprime moduli p_0 < p_1 < ... (MODULI = 5, 7, 8, 9, 11), an
index i in [0, p_0 p_1 ... p_(P-1)) is coded by P planes, plane f holding the unit vector

    F_f(i) = (-cos(2 pi i / p_f), sin(2 pi i / p_f)),

so <F(i), F(j)> = sum_f cos(2 pi (i - j) / p_f). This is P when i = j. Otherwise, by the Chinese
remainder theorem, some plane has (i - j) mod p_f != 0 and contributes at most cos(2 pi / p_f) instead
of 1: <F(i), F(j)> <= P - gap, gap = 1 - cos(2 pi / p_(P-1)) (0.234 for the 4 planes of m <= 2520,
0.158 for the 5 planes of m <= 16384). Every index comparison below relies on this gap.

Why this code: a GDN head produces plane f by rotating a 2-dim state by 2 pi / p_f per step, as a
product of two reflections whose keys are pi / p_f >= pi / 11 apart (see `retrieval`). Codes with slow
planes (e.g. a rotation by 2 pi / 4^7 per step) would need nearly parallel keys, and the chunked
operator's float32 error grows badly on those (measured: 1e-2 rad after 3000 steps, against 5e-6 for
the token-by-token recurrence); with these moduli every rotation is well conditioned. The index
tokens' embeddings hold the code verbatim (as CODE_OFFSET + F, so that every entry is >= 1 and passes
the short conv's SiLU unchanged at saturating scale).

Embedding features of a token (every row also gets `const` = 1 and a `filler` for a common norm):
punctuation `tok:<p>` (`tok:newline` for the line break); pointer letters `ptr` and `ptr:<j>` (j < k);
index tokens `digit` and `code:<f>:<c>` = CODE_OFFSET + F_f(value)[c]; the tokens "0" and "1" also
`bit` = -1 and +1 (the value a recalled bit carries).
"""

from __future__ import annotations

import math

from hybridlm.tasks.state_recall import POINTER_NAMES, PUNCTUATION
from hybridlm.theory.wiring import Terms

CODE_OFFSET = 2.0
MODULI = (5, 7, 8, 9, 11)  # pairwise coprime; products 5, 35, 280, 2520, 27720 >= MAX_BITS = 16384
TOKEN_FEATURE = {token: "tok:newline" if token == "\n" else f"tok:{token}" for token in PUNCTUATION}


# Token-class indicators: exactly one is 1 for every token except <pad> (never in a program).
NON_INDEX_CLASSES = (*TOKEN_FEATURE.values(), "ptr")


def code_planes(max_value: int) -> int:
    """P = number of planes that code indices 0 .. max_value - 1 (the least P with p_0 ... p_(P-1) >= max_value)."""
    capacity = math.prod(MODULI)
    if not 1 <= max_value <= capacity:
        raise ValueError(f"the index code covers 1..{capacity} index values; got max_value={max_value}")
    planes = 1
    while math.prod(MODULI[:planes]) < max_value:
        planes += 1
    return planes


def code_gap(planes: int) -> float:
    """The least amount by which <F(i), F(j)> falls below P = <F(i), F(i)> for i != j."""
    return 1.0 - math.cos(2.0 * math.pi / MODULI[planes - 1])


def index_code(value: int, planes: int) -> list[tuple[float, float]]:
    """F(value): one (x, y) unit vector per plane f < planes (see the module docstring)."""
    out = []
    for f in range(planes):
        angle = 2.0 * math.pi * (value % MODULI[f]) / MODULI[f]
        out.append((_snap(-math.cos(angle)), _snap(math.sin(angle))))
    return out


def _snap(x: float) -> float:
    """Round the cos/sin of multiples of pi/2 to their exact values (0, +-1)."""
    for exact in (-1.0, 0.0, 1.0):
        if abs(x - exact) < 1e-12:
            return exact
    return x


def code_feature(plane: int, axis: int) -> str:
    return f"code:{plane}:{axis}"


def embedding_features(pointers: int, planes: int) -> list[str]:
    """Names of the embedding features for a vocabulary with `pointers` letters in use and B planes."""
    names = ["const", *TOKEN_FEATURE.values(), "ptr", "digit", "bit"]
    names += [f"ptr:{j}" for j in range(pointers)]
    names += [code_feature(f, c) for f in range(planes) for c in range(2)]
    return names


def embedding_rows(vocab_tokens: tuple[str, ...], pointers: int, planes: int) -> list[Terms]:
    """One feature dict per token of a pointer-program vocabulary (index tokens are "0", "1", ...)."""
    letter_index = {name: j for j, name in enumerate(POINTER_NAMES)}
    rows: list[Terms] = []
    for token in vocab_tokens:
        row = {"const": 1.0}
        if token in TOKEN_FEATURE:
            row[TOKEN_FEATURE[token]] = 1.0
        elif token in letter_index:
            row["ptr"] = 1.0
            if letter_index[token] < pointers:
                row[f"ptr:{letter_index[token]}"] = 1.0
        elif token.isdigit():
            row["digit"] = 1.0
            if token in ("0", "1"):
                row["bit"] = 1.0 if token == "1" else -1.0
            for f, (x, y) in enumerate(index_code(int(token), planes)):
                row[code_feature(f, 0)] = CODE_OFFSET + x
                row[code_feature(f, 1)] = CODE_OFFSET + y
        rows.append(row)
    return rows
