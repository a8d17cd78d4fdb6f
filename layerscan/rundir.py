"""A run's output directory: proven writable before any work starts, and held by one run at a time.

Two runs writing one ``--out`` would both evaluate every configuration and interleave their
records; an unwritable one would fail only when the first record is written, after the model
loaded and the baseline was built.  A run therefore creates the directory, writes a probe file,
and takes an exclusive ``flock`` on ``.layerscan.lock`` inside it for as long as it runs (the
kernel releases it when the process dies, however it dies).  Workers of a shared study write
into their own directories and meet through the study's storage, not here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from layerscan.errors import UserError

LOCK_NAME = ".layerscan.lock"


def prepare_dir(out: Path, flag: str = "--out") -> Path:
    """Create ``out`` and prove a file can be written there, or say in one line why not."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; name a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{flag} {out} is not a writable directory ({exc.strerror or exc})") from None
    return out


def _holder() -> str:
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}"


@contextlib.contextmanager
def hold_run_dir(out: Path, wait: bool = False, flag: str = "--out") -> Iterator[Path]:
    """``out``, prepared and locked for this process until the block ends.

    Another holder makes this a one-line refusal naming it, or with ``wait`` a wait for it.
    """
    prepare_dir(out, flag)
    with open(out / LOCK_NAME, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            if not wait:
                raise UserError(f"{flag} {out} is in use by another layerscan run ({holder}); "
                                "wait for it to finish, pass --wait, or choose another "
                                f"{flag}") from None
            print(f"waiting for the layerscan run that holds {out} ({holder})", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(_holder() + "\n")
        fh.flush()
        try:
            yield out
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
