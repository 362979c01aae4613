"""The on-disk layout of a run folder: step folders, their manifests, the `latest` pointer.

    RUN/
      latest              the name of the newest complete step folder ("step-000400\\n"),
                          replaced by an atomic rename (a file, not a symlink: portable)
      step-000400/        one complete checkpoint (see gptkit.checkpoint.format for its files)
        manifest.json     written last: {"files": {name: {"size", "sha256"}}}
      step-000200/        older complete checkpoints (`--keep N`, default 2)
      metrics.jsonl, loss.png
      .lock               held (flock) by the process that trains into RUN, with its PID and host

A save builds `.step-000400.tmp-PID/`, writes the manifest last, renames the folder into
place and then switches `latest`: a step folder with a manifest is complete, and a kill at
any moment leaves the previous checkpoint and its pointer untouched. Temporary folders and
files a killed save left are removed at the next start. A step folder without a manifest is
never what a save leaves: it is damaged, never loaded and never deleted, but moved aside
(`step-N.damaged`) with a warning. One run at a time: training holds RUN/.lock (see RunLock).

Every command resolves the folder it is given through `resolve_checkpoint`: a run folder
(its `latest`), one step folder, or a flat folder from before this layout (read as it is).
This module does not import torch, so the tokenizer can resolve folders too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from gptkit.errors import GptkitError

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there (everything else works)
    fcntl = None
from gptkit.fileio import atomic_write_text, fsync_dir, recover_swap

MANIFEST = "manifest.json"
LATEST = "latest"
CONFIG = "config.json"
STEP_RE = re.compile(r"^step-(\d+)$")
MANIFEST_VERSION = 1
_HASH_CHUNK = 1 << 20

# `gptkit --no-verify`: check sizes only, not sha256 (for huge checkpoints). Set once by the CLI.
VERIFY_HASHES = True
_verified: dict[tuple, None] = {}  # step folders already hashed by this process (weights, then tokenizer)


def set_verify_hashes(on: bool) -> None:
    global VERIFY_HASHES
    VERIFY_HASHES = on


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(folder: Path) -> int:
    m = STEP_RE.match(folder.name)
    return int(m.group(1)) if m else -1


# ---------------------------------------------------------------------------- manifest
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file of folder (size, sha256); called when all of them are written."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(folder / MANIFEST, json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=2) + "\n")


def verify(folder: Path, hashes: bool | None = None) -> None:
    """Raise a GptkitError naming the first missing, resized or altered file of folder."""
    hashes = VERIFY_HASHES if hashes is None else hashes
    files = read_manifest(folder)
    key = (str(folder.resolve()), hashes, tuple((n, _stat(folder / n)) for n in sorted(files)))
    if key in _verified:
        return
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise GptkitError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["size"]:
            raise GptkitError(f"{path}: damaged ({size} bytes, {MANIFEST} says {entry['size']})")
        if hashes and sha256_file(path) != entry["sha256"]:
            raise GptkitError(f"{path}: damaged (sha256 differs from {MANIFEST})")
    _verified[key] = None


def read_manifest(folder: Path) -> dict[str, dict]:
    path = folder / MANIFEST
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not all(isinstance(e, dict) and isinstance(e["size"], int) and isinstance(e["sha256"], str)
                   for e in files.values()):
            raise TypeError
        return files
    except FileNotFoundError:
        raise GptkitError(f"{path}: missing (the save of {folder.name} did not complete)") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise GptkitError(f"{path}: damaged (not a gptkit manifest)") from None


def _stat(path: Path) -> tuple:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None, None


# ---------------------------------------------------------------------------- resolving
def step_folders(run: Path) -> list[Path]:
    """The complete step folders of a run (with a manifest), newest step first."""
    if not run.is_dir():
        return []
    found = [p for p in run.iterdir() if STEP_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of, reverse=True)


def read_latest(run: Path) -> Path | None:
    path = run / LATEST
    if not path.is_file():
        return None
    name = path.read_text(encoding="utf-8", errors="replace").strip()
    if not STEP_RE.match(name):
        raise GptkitError(f"{path}: damaged (expected a step folder name, got {name[:40]!r})")
    return run / name


def is_run(folder: Path) -> bool:
    return (folder / LATEST).is_file() or bool(step_folders(folder))


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """A run folder, a step folder or a flat checkpoint (without checking that it loads)."""
    folder = Path(folder)
    return (folder / CONFIG).is_file() or (folder / MANIFEST).is_file() or is_run(folder)


def resolve_checkpoint(folder: str | os.PathLike, verify_files: bool = True) -> Path:
    """The step folder a command should read: RUN/latest's target, or folder itself when it is
    a step folder or a flat checkpoint from before this layout (or not a checkpoint at all: the
    caller reports that). The manifest is checked; a damaged checkpoint is an error naming the
    file (and the newest intact one, to pass instead), never silently replaced."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        target = folder
    elif STEP_RE.match(folder.name) and folder.is_dir():  # a save never leaves a step folder unsealed
        raise GptkitError(f"{folder / MANIFEST}: missing, so the files cannot be verified (a step folder is sealed "
                          "by its manifest; this one is damaged)" + _intact_hint(folder.parent, folder))
    elif is_run(folder):
        target = read_latest(folder) or step_folders(folder)[0]
        if not target.is_dir():
            raise GptkitError(f"{folder / LATEST}: points to {target.name}, which is missing"
                              + _intact_hint(folder, target))
    else:
        return folder  # a flat (pre-manifest) checkpoint or a tokenizer folder: read as it is
    if verify_files:
        try:
            verify(target)
        except GptkitError as e:
            raise GptkitError(f"{e}{_intact_hint(target.parent, target)}") from None
    return target


def _intact_hint(run: Path, bad: Path) -> str:
    for p in step_folders(run):
        if p != bad:
            try:
                verify(p)
                return f"; the newest intact checkpoint is {p}"
            except GptkitError:
                continue
    return ""


def resume_candidate(run: str | os.PathLike, warn: Callable[[str], None]) -> Path:
    """The newest intact checkpoint of a run, for --resume: damaged ones are skipped with a
    warning naming the file. A flat checkpoint from before this layout is the run itself."""
    run = Path(run)
    # every step folder, sealed or not: one without a manifest is named in a warning too
    candidates = sorted((p for p in run.glob("step-*") if STEP_RE.match(p.name) and p.is_dir()),
                        key=step_of, reverse=True) if run.is_dir() else []
    for p in candidates:
        try:
            verify(p)
            return p
        except GptkitError as e:
            warn(f"warning: {e}; falling back to an older checkpoint")
    if (run / CONFIG).is_file():
        return run
    if candidates:
        raise GptkitError(f"{run}: no intact checkpoint to resume from (all {len(candidates)} are damaged)")
    raise GptkitError(f"{run}: no checkpoint to resume from")


# ---------------------------------------------------------------------------- writing
def temp_step_folder(run: Path, step: int) -> Path:
    tmp = run / f".{step_name(step)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, run: Path, step: int, pause: Callable[[], None] = lambda: None) -> Path:
    """Seal tmp with its manifest, move it to RUN/step-N and point `latest` at it.
    pause runs between the move and the pointer switch (a test hook)."""
    for p in tmp.iterdir():  # durable before the manifest vouches for them
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    write_manifest(tmp)
    fsync_dir(tmp)
    final = run / step_name(step)
    if final.exists():  # the same step saved again (a rerun, merge-lora into the same folder)
        aside = run / f".{final.name}.old-{os.getpid()}"
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside)
    else:
        os.rename(tmp, final)
    fsync_dir(run)
    pause()
    atomic_write_text(run / LATEST, final.name + "\n")
    fsync_dir(run)
    return final


def point_latest(run: Path, target: Path) -> None:
    if target.parent == run and STEP_RE.match(target.name):
        atomic_write_text(run / LATEST, target.name + "\n")


def prune(run: Path, keep: list[Path]) -> None:
    """Remove every step folder of run except those in keep (and latest's target)."""
    try:
        latest = read_latest(run)
    except GptkitError:  # a damaged pointer protects nothing; the next save rewrites it
        latest = None
    keep_names = {p.name for p in keep} | ({latest.name} if latest else set())
    for p in run.iterdir():
        if STEP_RE.match(p.name) and p.is_dir() and p.name not in keep_names:
            shutil.rmtree(p, ignore_errors=True)


def clean_leftovers(run: Path, warn: Callable[[str], None] = lambda m: None) -> list[str]:
    """Remove what a killed save left behind (temporary folders and files); move step folders
    without a manifest aside as damaged, with a warning. Returns the names removed."""
    if not run.is_dir():
        return []
    for old in sorted(run.glob(".step-*.old-*")):  # a step saved again, killed between its two renames
        if (done := recover_swap(run / old.name[1:].rpartition(".old-")[0])):
            warn(done)
    removed = []
    for p in sorted(run.iterdir()):
        if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
        elif STEP_RE.match(p.name) and p.is_dir() and not (p / MANIFEST).is_file():
            aside = p.with_name(f"{p.name}.damaged")
            os.rename(p, aside if not aside.exists() else p.with_name(f"{p.name}.damaged-{time.time_ns()}"))
            warn(f"warning: {p} has no {MANIFEST} (a save never leaves one so): moved aside to {aside.name}, "
                 "never loaded; delete it once you have looked")
    return removed


class RunLock:
    """An exclusive lock on a run folder for the life of a training run: RUN/.lock, flock'ed
    and holding the owner's PID and host. A second run into the same folder (a second
    --resume, workers left behind by a killed launcher) is refused in one line naming the
    owner; the kernel drops the lock when its process dies, so a stale lock is simply taken."""

    NAME = ".lock"

    def __init__(self, run: str | os.PathLike):
        self.path = Path(run) / self.NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise GptkitError(f"{self.path.parent}: in use by {holder}; wait for that run to end (or stop it), "
                                  "or give another --out") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # locked a file its owner removed on release: try the current one
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n"
                 .encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held; a newcomer checks it locked the current file
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False
