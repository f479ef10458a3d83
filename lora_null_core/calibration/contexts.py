"""How many distinct token prefixes calibration text holds: the bound on every layer input covariance's rank that
the safeguards and the top-up check."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class Contexts:
    """The distinct token prefixes of the sequences added so far: in a causal LM a token's activations are a
    function of its prefix, so their number bounds the rank of every layer's input covariance. 200 copies of one
    text count as one text; a token count would not notice.

    Counted on the sequences in sorted order, where each adds the tokens past its common prefix with the one
    before it: one sort, compared tuple by tuple in C, where a trie of every prefix costs a dictionary entry per
    token."""

    def __init__(self) -> None:
        self._sorted: list[tuple[int, ...]] = []
        self._count = 0

    def add(self, sequences: Sequence[Sequence[int]]) -> int:
        """Add sequences; the count so far. Many at once are merged in and counted again; one is inserted in order
        and adds the tokens past the longer common prefix with its two neighbours."""
        if len(sequences) == 1 and self._sorted:
            sequence = tuple(sequences[0])
            at = bisect.bisect(self._sorted, sequence)
            before = self._sorted[at - 1] if at else ()
            after = self._sorted[at] if at < len(self._sorted) else ()
            self._count += len(sequence) - max(_common_prefix(before, sequence), _common_prefix(sequence, after))
            self._sorted.insert(at, sequence)
        else:
            self._sorted = sorted([*self._sorted, *map(tuple, sequences)])
            previous = [(), *self._sorted[:-1]]
            self._count = sum(len(s) - _common_prefix(p, s) for p, s in zip(previous, self._sorted, strict=True))
        return self._count

    def __len__(self) -> int:
        return self._count


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    shared = 0
    for a, b in zip(first, second, strict=False):  # the shorter one ends it
        if a != b:
            break
        shared += 1
    return shared
