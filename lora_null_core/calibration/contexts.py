"""How many distinct token prefixes calibration text holds: the bound on every layer input covariance's rank that
the safeguards and the top-up check."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .batches import TokenBatch


class Contexts:
    """The distinct token prefixes of the sequences added so far: in a causal LM a token's activations are a
    function of its prefix, so their number bounds the rank of every layer's input covariance. 200 copies of one
    text count as one text; a token count would not notice."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, int], int] = {}  # (parent node, token) → node: a trie of the prefixes

    def add(self, ids: Iterable[int]) -> int:
        """Add one sequence; the count so far."""
        node = 0
        for token in ids:
            node = self._children.setdefault((node, token), len(self._children) + 1)
        return len(self)

    def __len__(self) -> int:
        return len(self._children)


def distinct_contexts(batches: Sequence[TokenBatch]) -> int:
    """How many different token prefixes the batches hold (Contexts)."""
    contexts = Contexts()
    for batch in batches:
        for ids, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), strict=True):
            contexts.add(token for token, real in zip(ids, mask, strict=True) if real)
    return len(contexts)
