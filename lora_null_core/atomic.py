"""Outputs that appear whole or not at all, and never at the expense of an input or of unrelated files.

Every output is built in a staging folder beside its destination and renamed into place at the end, so a
crash, a bad input or a kill leaves no half-written folder (a later run sweeps the staging folders of killed
runs). `check_output` runs before any compute: an output may not be, contain or lie inside one of the job's
inputs, and `--overwrite` replaces only an earlier lora-null output or an empty folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import LoraNullError, OutputExistsError
from .layout import OUTPUT_MARKERS

# A path as callers give it: a string or a path object.
StrPath = str | os.PathLike[str]


def check_output(
    path: StrPath,
    inputs: Iterable[StrPath | None] = (),
    overwrite: bool = False,
    flag: str = "--output",
    may_nest_in: Iterable[StrPath | None] = (),
) -> Path:
    """Refuse, before any compute, an output that would destroy an input, unrelated files, or cannot be written.
    `may_nest_in`: inputs the output may lie inside (a trained adapter's own lora_null_export/ subfolder)."""
    path = Path(path).expanduser()
    target = path.resolve()
    nests = {Path(p).expanduser().resolve() for p in may_nest_in if p is not None}
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue  # hub names and generated inputs cannot collide with a local folder
        resolved = Path(source).expanduser().resolve()
        inside = target.is_relative_to(resolved) and resolved not in nests
        if target == resolved or resolved.is_relative_to(target) or inside:
            raise OutputExistsError(
                f"{flag} {path} overlaps the input {source}: writing it would destroy or alter that input. "
                f"Choose an {flag} outside every input folder."
            )
    if path.exists():
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; choose another {flag} or pass --overwrite.")
        if not path.is_dir():
            raise OutputExistsError(
                f"{path} is a file, not an output folder of lora-null; remove it or choose another {flag}."
            )
        if any(path.iterdir()) and not any((path / marker).is_file() for marker in OUTPUT_MARKERS):
            raise OutputExistsError(
                f"{path} holds files lora-null did not write, and --overwrite replaces only an earlier lora-null "
                f"output or an empty folder. Remove it yourself or choose another {flag}."
            )
    parent = _existing_parent(target)
    try:  # a real attempt: permission bits do not stop root, a read-only mount does
        Path(tempfile.mkdtemp(prefix=".lora-null-write-check-", dir=parent)).rmdir()
    except OSError as err:
        raise LoraNullError(
            f"Cannot write {path}: {parent} is not writable ({err.strerror}). Choose another {flag}."
        ) from err
    return path


@contextlib.contextmanager
def atomic_output_dir(path: StrPath, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block finishes."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another --output or pass --overwrite.")
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield staging
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
            path.rename(trash / "old")
            staging.rename(path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def sweep_stale_staging(path: Path) -> None:
    """Remove the staging folders a killed run left beside `path` (their process id no longer runs)."""
    for kind in ("tmp", "old"):
        for leftover in path.parent.glob(f".{path.name}.{kind}-*-*"):
            pid = leftover.name[len(f".{path.name}.{kind}-") :].split("-", 1)[0]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _existing_parent(path: Path) -> Path:
    for candidate in [path.parent, *path.parent.parents]:
        if candidate.exists():
            return candidate
    return Path("/")
