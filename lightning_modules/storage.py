"""Files the project writes and reads back: atomic writes (a kill or a full disk never leaves a cut file under the
real name) and content-verified caches (a cached file is checked against the hash written with it; one that fails
is moved aside with a warning and computed again, never trusted)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def write_atomically(path: Path, data: str | bytes) -> None:
    """`path` holds `data` whole or keeps what it held before: written beside it (same file system, so the rename
    never copies), flushed to disk, renamed, and the directory entry flushed too (a kill or a full disk mid-write
    leaves no truncated file under the real name)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename is durable only then); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def content_hash(*parts: bytes) -> str:
    return hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).hexdigest()


def cache_key(payload: dict) -> str:
    """A cache entry's name from everything its contents depend on (JSON, keys sorted): 20 hex digits of sha256."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def write_verified(path: Path, data: bytes) -> None:
    """`data` at `path` and its content hash at `path.sha256`, both atomically (`read_verified` checks it)."""
    write_atomically(path, data)
    write_atomically(path.with_name(path.name + ".sha256"), content_hash(data))


def read_verified(path: Path) -> bytes | None:
    """The bytes at `path` when they match the content hash written with them; None when there is no file. A file
    that fails the check (changed, cut short, its hash missing) is named in a warning and moved aside
    (`<name>.bad-<pid>`): the caller computes it again."""
    path = Path(path)
    if not path.exists():
        return None
    digest = path.with_name(path.name + ".sha256")
    try:
        data = path.read_bytes()
        if not digest.exists() or digest.read_text().strip() != content_hash(data):
            raise ValueError("its content does not match the hash written with it")
        return data
    except (OSError, ValueError) as e:
        move_aside(path, e)
        digest.unlink(missing_ok=True)
        return None


def move_aside(path: Path, reason: object) -> None:
    """A cached file or directory that failed its check, renamed out of the way with a warning naming it."""
    aside = path.with_name(f"{path.name}.bad-{os.getpid()}")
    log.warning("cache: %s failed its check (%s): moved to %s and computed again", path, reason, aside)
    os.replace(path, aside)


def atomic_checkpoint_io():
    """Lightning's `TorchCheckpointIO` writing each local checkpoint with `write_atomically`: beside its final
    name (Lightning's own transaction writes to the system's temporary directory, and a rename across devices
    copies, so a full disk left a cut `epoch=0-step=6.ckpt` under its real name), flushed, then renamed. Other
    file systems (URLs) keep Lightning's own save."""
    import io

    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from lightning_modules.progress import phase

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
            if "://" in str(path) or storage_options is not None:
                return super().save_checkpoint(checkpoint, path, storage_options)
            with phase("checkpoint"):
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                write_atomically(Path(path), buffer.getvalue())

    return AtomicCheckpointIO()
