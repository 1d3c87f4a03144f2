"""Write output folders all at once: a crash or an error never leaves a half-written checkpoint behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_folder(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """The one output policy of every command: a folder that exists and holds files is refused unless `overwrite`
    (--overwrite); a file in its place always is. Called before any slow work, so a refusal costs nothing."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; give a folder path for the output.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose another folder or pass overwrite=True "
                              "(--overwrite on the command line).")
    return target


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill; on success it replaces `target`, on error it is removed."""
    target = check_output_folder(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
