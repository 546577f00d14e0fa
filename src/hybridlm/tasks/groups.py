"""The finite groups of the word-problem tasks, as permutation groups with a canonical element order.

| group  | order | acts on  | word problem                                      |
|--------|-------|----------|---------------------------------------------------|
| S5     | 120   | 5 points | NC1-complete (non-solvable; Barrington)           |
| A5     | 60    | 5 points | NC1-complete (the smallest non-solvable group)    |
| A4xZ5  | 60    | 9 points | in TC0 (solvable control of the same order as A5) |
| Z60    | 60    | 12 points| in TC0 (abelian control)                          |

A permutation is a tuple p in one-line notation: p[i] is the image of point i. Products read left to right
(the left factor acts first): `compose(p, q)[i] == q[p[i]]`, and a word x1 x2 ... xt has the running
product x1 * x2 * ... * xt. Index 0 is always the identity.

Canonical order and element names:
- S5, A5: permutations of 0..4 in lexicographic order; the name is the one-line notation, e.g. "10234".
- A4xZ5: pairs (a, z), a in A4 (even permutations of 0..3, lexicographic) and z in Z5; index 5 * index(a) + z;
  the name is "(1032,3)". As a permutation, a acts on points 0..3 and z rotates points 4..8 by z.
- Z60: residues r = 0..59, the name is "r". As a permutation, r is g^r for g = a 4-cycle, a 3-cycle and a
  5-cycle on disjoint points (order lcm(4, 3, 5) = 60).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

Permutation = tuple[int, ...]

GROUP_NAMES = ("S5", "A5", "A4xZ5", "Z60")


def compose(first: Permutation, second: Permutation) -> Permutation:
    """The product first * second: apply `first`, then `second`."""
    return tuple(second[image] for image in first)


def is_even(permutation: Permutation) -> bool:
    """True if the permutation is a product of an even number of transpositions (even inversion count)."""
    inversions = sum(
        1 for i in range(len(permutation)) for j in range(i + 1, len(permutation)) if permutation[i] > permutation[j]
    )
    return inversions % 2 == 0


@dataclass(frozen=True, eq=False)
class Group:
    """A finite permutation group with canonically indexed elements.

    elements: the permutations, identity first.
    names: one printable name per element (used as its token).
    table: [order, order] int64 Cayley table, table[i, j] = index of elements[i] * elements[j].
    solvable: whether the group is solvable (its word problem is then in TC0).
    """

    name: str
    elements: tuple[Permutation, ...]
    names: tuple[str, ...]
    table: np.ndarray
    solvable: bool

    @property
    def order(self) -> int:
        return len(self.elements)

    def index(self, permutation: Permutation) -> int:
        try:
            return self._index[tuple(permutation)]
        except KeyError:
            raise ValueError(f"{permutation} is not an element of {self.name}") from None

    @functools.cached_property
    def _index(self) -> dict[Permutation, int]:
        return {element: i for i, element in enumerate(self.elements)}

    def multiply(self, left: int, right: int) -> int:
        """Index of elements[left] * elements[right]."""
        return int(self.table[left, right])


def _cycle_block(offset: int, size: int, shift: int) -> tuple[int, ...]:
    """Images of points offset..offset+size-1 under the rotation i -> i + shift (mod size) of that block."""
    return tuple(offset + (i + shift) % size for i in range(size))


def _build(name: str, elements: list[Permutation], names: list[str], solvable: bool) -> Group:
    index = {element: i for i, element in enumerate(elements)}
    order = len(elements)
    table = np.empty((order, order), dtype=np.int64)
    for i, left in enumerate(elements):
        for j, right in enumerate(elements):
            product = compose(left, right)
            if product not in index:
                raise AssertionError(f"{name} is not closed: {left} * {right} = {product} is missing")
            table[i, j] = index[product]
    table.setflags(write=False)
    return Group(name, tuple(elements), tuple(names), table, solvable)


@functools.lru_cache(maxsize=None)
def get_group(name: str) -> Group:
    """The group called `name` (one of GROUP_NAMES), built once and cached."""
    if name in ("S5", "A5"):
        elements = sorted(itertools.permutations(range(5)))
        if name == "A5":
            elements = [p for p in elements if is_even(p)]
        return _build(name, elements, ["".join(map(str, p)) for p in elements], solvable=False)
    if name == "A4xZ5":
        a4 = [p for p in sorted(itertools.permutations(range(4))) if is_even(p)]
        elements, names = [], []
        for a in a4:
            for z in range(5):
                elements.append(a + _cycle_block(4, 5, z))
                names.append(f"({''.join(map(str, a))},{z})")
        return _build(name, elements, names, solvable=True)
    if name == "Z60":
        elements = [_cycle_block(0, 4, r) + _cycle_block(4, 3, r) + _cycle_block(7, 5, r) for r in range(60)]
        return _build(name, elements, [str(r) for r in range(60)], solvable=True)
    raise ValueError(f"unknown group {name!r}; valid groups: {', '.join(GROUP_NAMES)}")
