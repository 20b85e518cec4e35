"""Output folders and files: checked before any computation, written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output location that cannot receive the results (named by its option)."""


def check_out_dir(path: str | Path, option: str = "--out") -> Path:
    """Raise ``OutputError`` unless ``path`` is, or can become, a writable folder.

    Nothing is created: the nearest existing folder on the way to ``path`` must be a
    folder (not a file) and accept a new file (probed with a temporary file, which
    covers read-only mounts, ACLs and permissions alike, and root)."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is an existing file" if probe == path else f"is under the file {probe}"
        raise OutputError(f"{option} {path} {where}; give a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot write in {probe} ({exc.strerror or exc})") from None
    return path


def _file_mode() -> int:
    """0666 less the process umask: the mode ``open`` gives a new file (0644 under
    the usual umask 022), which ``tempfile`` would otherwise narrow to 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``
    (mode as for a new file), on failure removed, so ``path`` is whole or untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
