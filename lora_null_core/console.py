"""What a person sees while lora-null works: one progress bar per long stage, no library noise.

`progress` is the only way the core draws a bar, so `set_verbosity` (the CLI's -q / -v) governs them all.
`quiet_libraries` wraps each call into transformers, PEFT and datasets that would otherwise draw its own
bars ("Loading weights", "Writing model shards", "Generating train split") or warn about its own internals
(PEFT ≤ 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`); the user's settings are
restored afterwards, so a script that imports lora-null keeps its own.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

QUIET, NORMAL, VERBOSE = -1, 0, 1
_verbosity = {"level": NORMAL}

# Warnings raised by one library about another's internals: nothing a user can act on.
_LIBRARY_WARNINGS = (r".*is_gradient_checkpointing.*is deprecated.*",)


# Log lines libraries print on import, about an optional speed-up a user has no reason to install: bitsandbytes
# 0.50 on a CPU with AVX512-BF16 and without the `kernels` package (its plain CPU path works the same).
_IMPORT_NOTICES = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_import_notices() -> None:
    """Before anything imports the libraries that print them (PEFT imports bitsandbytes when it is installed):
    only those lines go; everything else those loggers say still shows."""
    for name, prefix in _IMPORT_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))


def set_verbosity(level: int) -> None:
    """QUIET: errors and the final result only; NORMAL: progress bars and INFO lines; VERBOSE: DEBUG too."""
    _verbosity["level"] = level
    logging.getLogger("lora_null_core").setLevel(
        logging.WARNING if level == QUIET else logging.DEBUG if level == VERBOSE else logging.INFO
    )


def progress(iterable: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterator[T]:
    """A bar for one long stage; none when quiet. Bars vanish when done, so the log keeps only results."""
    return iter(tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, disable=_verbosity["level"] == QUIET))


def progress_bar(total: int, desc: str, unit: str) -> tqdm:
    """The same bar, advanced by hand (`update(n)`, then `close()`): for a stage whose steps vary in size."""
    return tqdm(desc=desc, unit=unit, total=total, leave=False, disable=_verbosity["level"] == QUIET)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence transformers', datasets' and PEFT's own bars and internal warnings for the block."""
    import transformers.utils.logging as hf_logging

    restore = []
    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        restore.append(hf_logging.enable_progress_bar)
    try:
        import datasets

        if not datasets.are_progress_bars_disabled():
            datasets.disable_progress_bars()
            restore.append(datasets.enable_progress_bars)
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            for pattern in _LIBRARY_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for undo in restore:
            undo()


silence_import_notices()
