"""Where calibration text comes from: a local file or folder, a saved `datasets` folder, a hub dataset, a Dataset or
a list, read with errors that name the file, the line and the fix."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..console import quiet_libraries
from ..errors import CalibrationDataError

CalibrationSource = str | os.PathLike | Sequence[Any] | Any  # path, hub name, datasets.Dataset, list of rows

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


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
            raise CalibrationDataError(
                f"The training dataset has no {column!r} column (columns: {', '.join(names)}); "
                "it is read as the trainer tokenized it."
            )
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
        raise CalibrationDataError(
            f"Reading the task data (--task-data, task_data=, lora_null_task_data): {err}"
        ) from None


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
        raise CalibrationDataError(
            f"Calibration file {path} has an unknown suffix; use .jsonl, .json, .parquet, .csv or .txt."
        )
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
        bad = next(
            filter(None, map(_bad_jsonl_line, [Path(f) for f in ([files] if isinstance(files, str) else files)])), None
        )
        raise CalibrationDataError(bad or f"Could not read calibration file {path}: {_first_line(err)}") from err


def _bad_jsonl_line(path: Path) -> str | None:
    """datasets only says "An error occurred while generating the dataset": the file and line that is not JSON."""
    if path.suffix != ".jsonl":
        return None
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as err:
                    return (
                        f"Calibration file {path}, line {number}, is not JSON ({err}): {line.strip()[:80]!r}. "
                        "Each line of a .jsonl file must be one JSON object."
                    )
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


def describe(source: CalibrationSource) -> str:
    if isinstance(source, CalibrationRows):
        return source.source
    if isinstance(source, TokenizedRows):
        return f"the training data as the trainer tokenized it ({len(source)} rows)"
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__} of {len(source) if hasattr(source, '__len__') else '?'} rows>"
