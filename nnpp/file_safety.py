"""Files read and written safely: nothing nnpp writes is ever seen half-written, nothing it deletes belongs to a
live run, and a missing or corrupt file is one line naming it.

* :func:`replace_atomically` / :func:`write_atomic`: a fresh temp file beside the target (``.tmp<pid>``), renamed
  over it when complete (``durable``: fsynced, and the folder too); a crash leaves at most that temp file, which
  nothing promotes.
* :func:`load_json_file`: ``json.load`` with one-line errors.
* :func:`owner_suffix` / :func:`owner_alive`: temp folders whose name says which process writes them; only a dead
  owner's folder (or one that names none) is a killed run's leftover.
"""
from __future__ import annotations

import contextlib
import json
import os
import re

from nnpp import NnppError

OWNER_RE = re.compile(r"\.owner(\d+)-([0-9a-f]{8})$")  # the end of a temp folder's name: its owner


@contextlib.contextmanager
def replace_atomically(path: str, mode: str = "w", durable: bool = False):
    """``with replace_atomically(path) as f: ...`` writes ``f``, a fresh temp file beside ``path``, and renames it
    over ``path`` when the block ends without an error: a reader sees the old file or the whole new one, never a
    part. The temp file is removed whatever happens. ``durable``: the file is fsynced before the rename and the
    folder after it (the rename itself reaches the disk)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if durable:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """``text`` into ``path`` through a temp file and a rename (:func:`replace_atomically`): never a half-written
    file."""
    with replace_atomically(path) as f:
        f.write(text)


def load_json_file(path: str, what: str, missing_hint: str = "", fix: str = "regenerate it"):
    """``json.load`` with one-line errors: ``{what} not found: {path}[; missing_hint]`` and
    ``{what} is not valid JSON (...); {fix}``."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise NnppError(f"{what} not found: {path}" + (f"; {missing_hint}" if missing_hint else "")) from None
    except json.JSONDecodeError as e:
        raise NnppError(f"{what} is not valid JSON ({path}: {e}); {fix}") from None


def owner_space() -> str:
    """8 hex digits naming where this process's pid means something: the host name and, on Linux, the pid namespace
    (containers that share a host name but not their pids stay apart)."""
    import hashlib
    import socket
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()}:{namespace}".encode()).hexdigest()[:8]


def owner_suffix() -> str:
    """The end of a temp folder's name that names this process as its owner (``.ownerPID-SPACE``; see
    :func:`owner_alive`). Use as ``tempfile.mkdtemp(prefix=..., suffix=owner_suffix(), dir=...)``."""
    return f".owner{os.getpid()}-{owner_space()}"


def owner_alive(name: str) -> bool:
    """Whether the owner named at the end of a temp folder's ``name`` may still be writing it: a live process here
    (same host and pid namespace), any process elsewhere (that machine clears its own: a shared folder), or any
    process where this cannot be asked (Windows). Only a dead owner's folder, or one that names no owner (older
    nnpp), is left over from a killed run; two runs sharing a folder never delete each other's work."""
    m = OWNER_RE.search(name)
    if m is None:
        return False
    if m.group(2) != owner_space() or os.name == "nt":
        return True
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: alive, another user's
        return True
    return True
