"""Files written whole or not at all, with the permissions of any newly created file.

``atomic_write`` writes to a temporary file in the same folder, flushes and fsyncs it, renames it
over the target and fsyncs the folder: a crash leaves the old file or the new one, never a torn
one. The file then gets the mode ``open()`` would give a new file (0666 less the umask: 0644
under the usual umask 022), not the 0600 of the temporary file, so checkpoints, exports and
embeddings follow one rule with everything else selfsight writes.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def new_file_mode() -> int:
    """0666 less this process's umask (read from /proc where it can be, without changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file and move it to ``path`` atomically (module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:                 # a folder that cannot be opened for reading: the rename is done
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
