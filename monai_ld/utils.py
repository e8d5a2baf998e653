"""Small shared helpers."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable

import torch

__all__ = ["atomic_write", "log_progress", "set_threads"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int = 0o644, suffix: str = ".tmp") -> str:
    """Write a file atomically: ``write(tmp_path)`` fills a temporary file beside ``path``, then ``os.replace``.

    Never leaves a half-written ``path``; the file gets ``mode`` (mkstemp would leave it owner-only). ``suffix``
    lets writers that pick the format from the name (nibabel) see the real extension.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def log_progress(msg: str, progress: bool = True) -> None:
    """One progress line on stderr (stdout stays for results), when ``progress``."""
    if progress:
        print(msg, file=sys.stderr, flush=True)


def set_threads(num_threads: int | None) -> None:
    """``torch.set_num_threads`` when a count is given (None keeps torch's choice)."""
    if num_threads:
        torch.set_num_threads(int(num_threads))
