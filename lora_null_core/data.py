"""Calibration data: any user source → chosen texts → padded token batches.

The texts should carry the knowledge to preserve (the paper: NQ-open questions). Calibration and held-out
samples are drawn disjointly from one seeded permutation, so leakage on held-out text is an honest check.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .console import quiet_libraries
from .errors import CalibrationDataError

logger = logging.getLogger(__name__)

CalibrationSource = Union[str, os.PathLike, Sequence[Any], Any]  # path, hub name, datasets.Dataset, list of rows

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor  # (batch, seq), right-padded
    attention_mask: torch.Tensor  # (batch, seq), 1 on real tokens

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class CalibrationTexts:
    calibration: list[str]
    holdout: list[str]
    source: str


@dataclass(frozen=True)
class CalibrationRows:
    """A source already read (the CLI reads it before loading the model), still named by where it came from."""

    rows: Sequence[Any]
    source: str


class TokenizedRows(Sequence):
    """A dataset a trainer has already tokenized (its `input_ids` column), read back as text: what the model will
    see in training, templates and responses included. Rows decode when read, so drawing 256 of a million costs
    256 decodes."""

    def __init__(self, dataset: Any, tokenizer: Any, column: str = "input_ids") -> None:
        names = getattr(dataset, "column_names", None)
        if names is not None and column not in names:
            raise CalibrationDataError(f"The training dataset has no {column!r} column (columns: {', '.join(names)}); "
                                       "it is read as the trainer tokenized it.")
        self.dataset, self.tokenizer, self.column = dataset, tokenizer, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.tokenizer.decode(self.dataset[index][self.column], skip_special_tokens=False)


@contextmanager
def reading_task_data() -> Iterator[None]:
    """The loaders' messages speak of calibration text, their usual input: a fault in the task data says so."""
    try:
        yield
    except CalibrationDataError as err:
        raise CalibrationDataError(f"Reading the task data (--task-data, task_data=, lora_null_task_data): {err}") \
            from None


def load_rows(source: CalibrationSource) -> Sequence[Any]:
    """Rows of a local file, a saved `datasets` folder, a hub dataset name, a Dataset or a list."""
    if isinstance(source, CalibrationRows):
        return source.rows
    if isinstance(source, (str, os.PathLike)):
        return _load_path_or_hub(str(source))
    if isinstance(source, Mapping):
        raise CalibrationDataError("Calibration source is a dict; pass a Dataset (pick a split), a path or a list.")
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
        raise CalibrationDataError(
            f"Calibration source of type {type(source).__name__} is not supported: pass a path "
            "(.jsonl/.json/.parquet/.csv/.txt), a datasets.Dataset, or a list of strings or rows."
        )
    return source


def _load_path_or_hub(source: str) -> Sequence[Any]:
    with quiet_libraries():
        return _load_rows(source)


def _load_rows(source: str) -> Sequence[Any]:
    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            try:
                return datasets.load_from_disk(str(path))
            except Exception as err:  # noqa: BLE001 - a damaged or foreign folder fails in many ways
                raise CalibrationDataError(
                    f"Calibration folder {path} looks like a saved `datasets` folder (it has dataset_info.json or "
                    f"state.json) but cannot be read as one ({_first_line(err)}). Point --calibration at the data "
                    "file itself, or save the dataset again with Dataset.save_to_disk."
                ) from err
        files = sorted(p for p in path.iterdir() if p.suffix in _FILE_BUILDERS)
        if not files:
            raise CalibrationDataError(f"Calibration folder {path} holds no .jsonl/.json/.parquet/.csv/.txt file.")
        for file in files:
            _check_text_file(file)
        return _load_files(_FILE_BUILDERS[files[0].suffix], [str(f) for f in files], path)
    if path.suffix in _FILE_BUILDERS:
        if not path.is_file():
            raise CalibrationDataError(f"Calibration file {path} does not exist.")
        if path.stat().st_size < 4096 and not path.read_bytes().strip():
            raise CalibrationDataError(f"Calibration file {path} is empty; it needs at least one text.")
        _check_text_file(path)
        return _load_files(_FILE_BUILDERS[path.suffix], str(path), path)
    if path.exists():
        raise CalibrationDataError(f"Calibration file {path} has an unknown suffix; use .jsonl, .json, .parquet, .csv "
                                   "or .txt.")
    # Not a local path: treat it as a dataset on the hub ("org/name" or "org/name:split").
    name, _, split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs one message
        raise CalibrationDataError(
            f"Could not load calibration dataset {source!r} (not a local file, and the hub load failed: {err}). "
            "Pass a local .jsonl/.json/.parquet file, or check the dataset name and your network."
        ) from err


def _load_files(builder: str, files: Any, path: Path) -> Sequence[Any]:
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as err:  # noqa: BLE001 - parser errors vary by format and datasets version
        bad = next(filter(None, map(_bad_jsonl_line, [Path(f) for f in ([files] if isinstance(files, str) else files)])),
                   None)
        raise CalibrationDataError(bad or f"Could not read calibration file {path}: {_first_line(err)}") from err


def _bad_jsonl_line(path: Path) -> Optional[str]:
    """datasets only says "An error occurred while generating the dataset": the file and line that is not JSON."""
    if path.suffix != ".jsonl":
        return None
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as err:
                    return (f"Calibration file {path}, line {number}, is not JSON ({err}): {line.strip()[:80]!r}. "
                            "Each line of a .jsonl file must be one JSON object.")
    return None


def _check_text_file(path: Path) -> None:
    """Text formats must be UTF-8: checked here, with the byte offset, instead of deep inside a parser."""
    if path.suffix == ".parquet":
        return
    with open(path, "rb") as handle:
        offset = 0
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as err:
                if err.start < len(chunk) - 4:  # not merely a character cut by the chunk boundary
                    raise CalibrationDataError(
                        f"Calibration file {path} is not UTF-8 (byte {offset + err.start}); convert it, e.g. "
                        f"iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}."
                    ) from err
            offset += len(chunk)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def row_to_text(row: Any, tokenizer: Any, text_field: str) -> str:
    """One row's text: the text field, or chat messages rendered with the tokenizer's chat template."""
    if isinstance(row, str):
        return row
    if not isinstance(row, Mapping):
        raise CalibrationDataError(f"Calibration row of type {type(row).__name__} is neither a string nor a mapping.")
    if text_field in row and isinstance(row[text_field], str):
        return row[text_field]
    if text_field in row and row[text_field] is not None:
        value = row[text_field]
        raise CalibrationDataError(
            f"Calibration column {text_field!r} holds {type(value).__name__} values (e.g. {value!r:.60}), not text; "
            "pass --text-field with the column that holds the text."
        )
    if "messages" in row and isinstance(row["messages"], list):
        if not getattr(tokenizer, "chat_template", None):
            raise CalibrationDataError(
                "Calibration rows hold 'messages' but the tokenizer has no chat template; set one, or point "
                "--text-field at a plain-text column."
            )
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if text_field in row:  # None: a row of a .jsonl that lacks the field, skipped as empty
        return ""
    raise CalibrationDataError(
        f"Calibration row has no text field {text_field!r} (columns: {', '.join(map(str, row))}); "
        "pass --text-field with the column that holds the text, or use a 'messages' column."
    )


def choose_texts(
    source: CalibrationSource, tokenizer: Any, num_samples: int, holdout_samples: int, seed: int, text_field: str,
    until: Optional[Callable[[str], bool]] = None,
) -> CalibrationTexts:
    """Draw `num_samples` calibration texts and up to `holdout_samples` disjoint held-out texts. `until` is told of
    each calibration text in turn and says whether there are enough: when it has not said so after `num_samples`,
    more calibration texts are drawn (after the held-out ones, which stay the same) until it does or the source
    runs out."""
    rows = load_rows(source)
    if len(rows) == 0:
        raise CalibrationDataError(f"Calibration source {describe(source)} is empty; it needs at least one text.")
    order = _texts_in_random_order(rows, tokenizer, text_field, seed)
    calibration = list(itertools.islice(order, num_samples))
    holdout = list(itertools.islice(order, holdout_samples))
    if not calibration:
        raise CalibrationDataError(f"Calibration source {describe(source)} holds only empty texts.")
    if until is not None and not [until(text) for text in calibration][-1]:  # every text told, in turn
        for text in order:
            calibration.append(text)
            if until(text):
                break
    if len(calibration) < num_samples:
        logger.info("Calibration source has %d non-empty texts; asked for %d.", len(calibration), num_samples)
    if holdout_samples and len(holdout) < holdout_samples:
        logger.info("Only %d held-out texts left after calibration (asked for %d).", len(holdout), holdout_samples)
    return CalibrationTexts(calibration, holdout, describe(source))


def _texts_in_random_order(rows: Sequence[Any], tokenizer: Any, text_field: str, seed: int) -> Iterator[str]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    for index in order:
        text = row_to_text(rows[index], tokenizer, text_field)
        if text.strip():
            yield text


def describe(source: CalibrationSource) -> str:
    if isinstance(source, CalibrationRows):
        return source.source
    if isinstance(source, TokenizedRows):
        return f"the training data as the trainer tokenized it ({len(source)} rows)"
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__} of {len(source) if hasattr(source, '__len__') else '?'} rows>"


def tokenize_batches(texts: Sequence[str], tokenizer: Any, max_length: int, batch_size: Optional[int] = None,
                     batch_tokens: Optional[int] = None, min_batches: int = 1) -> list[TokenBatch]:
    """Tokenize, sort by length, right-pad into batches with an attention mask.

    Batches are filled up to `batch_tokens` padded tokens (rows × the batch's longest row), so thousands of
    short prompts cost a few forward passes, not thousands; `batch_size` also caps the rows when given.
    `min_batches`: at least this many batches (one per process) when there are that many texts."""
    sequences = [ids for ids in (token_ids(text, tokenizer, max_length) for text in texts) if ids]
    if not sequences:
        raise CalibrationDataError("Every calibration text tokenized to zero tokens.")
    if not batch_size and not batch_tokens:
        raise ValueError("tokenize_batches needs batch_size or batch_tokens")
    sequences.sort(key=len, reverse=True)
    most_rows = -(-len(sequences) // max(1, min_batches))
    if batch_size:
        most_rows = min(most_rows, batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches, start = [], 0
    while start < len(sequences):
        width = len(sequences[start])  # the longest left: sorted
        rows = min(most_rows, max(1, batch_tokens // width)) if batch_tokens else most_rows
        chunk = sequences[start : start + rows]
        start += len(chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        batches.append(TokenBatch(ids, mask))
    return batches


def token_ids(text: str, tokenizer: Any, max_length: int) -> list[int]:
    """A text's tokens as calibration reads them: cut at max_length, with the tokenizer's special tokens."""
    # A rendered chat template already carries its special tokens; adding them again would double BOS.
    special = not _starts_with_special(text, tokenizer)
    return list(tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=special)["input_ids"])


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
        for ids, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist()):
            contexts.add(token for token, real in zip(ids, mask) if real)
    return len(contexts)


def _starts_with_special(text: str, tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)
