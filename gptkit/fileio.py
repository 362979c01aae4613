"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target.

A reader (or a resumed run after a crash) sees either the old file or the new one, never half.
Whole folders the same way: built in a temporary folder beside the target, swapped in by rename.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def file_mode() -> int:
    """The mode a plainly created file gets under this process's umask (mkstemp's files, and
    safetensors', are 0600, which would hide checkpoints and reports from a teammate or a web server)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) to produce the file, then move it into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # after: a writer may have replaced the file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside a folder durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- whole folders
def temp_folder_beside(out: Path) -> Path:
    """A new empty `.OUT.tmp-PID/` next to out (same file system: the swap is a rename);
    leftovers of killed runs into the same out are removed first."""
    _remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    return tmp


def _remove_stale_temps(out: Path) -> None:
    """Temporary folders of killed runs into the same OUT (their process is gone), once an
    interrupted swap has been finished or undone."""
    recover_swap(out)
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name.rpartition("-")
        if kind.endswith((".tmp", ".old")) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_swap(out: Path) -> str | None:
    """After a kill between swap_in's two renames, OUT is missing, `.OUT.old-PID` holds its
    previous contents and `.OUT.tmp-PID` the new ones, finished (the swap starts only then).
    Finish the swap, or put the old contents back when the new ones are not there; never leave
    both to be removed as leftovers. Returns what was done (None: nothing to do)."""
    if out.exists():
        return None
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        pid = old.name.rpartition("-")[2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        new = out.parent / f".{out.name}.tmp-{pid}"
        if new.is_dir():
            os.rename(new, out)
            shutil.rmtree(old, ignore_errors=True)
            return f"finished the interrupted replacement of {out.name} (by process {pid})"
        os.rename(old, out)
        return f"restored {out.name}, which an interrupted replacement (process {pid}) had moved aside"
    return None


def swap_in(tmp: Path, out: Path) -> None:
    """Replace out by the finished tmp folder: two renames; the old contents are deleted after.
    A reader sees the old folder or the new one, never a mix."""
    fsync_dir(tmp)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    fsync_dir(out.parent)
