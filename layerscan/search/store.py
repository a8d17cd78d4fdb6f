"""Where a run's trials live on disk: their records and their images.

``TrialStore`` is the resumable ``trials.jsonl`` (one fsynced JSON line per evaluation, a line cut
short by a kill set aside on open); ``TrialImages`` keeps every evaluation's images as PNG under the
cache, one directory per configuration (``config_digest``).  Both only store and read back; what
a record means under today's criterion, and whether a new evaluation may start, is the
``TrialLedger``'s business (:mod:`layerscan.search.ledger`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from layerscan.configs import Ignored
from layerscan.evaluate import TrialRecord
from layerscan.generate import load_png, save_png


def _parse_line(line: bytes) -> dict | None:
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or "eval_key" not in data or not isinstance(data.get("record"), dict):
        return None
    return data


class TrialStore:
    """Every evaluated configuration, appended to a JSON-lines file the moment it finishes.

    Records made under other evaluation settings (another prompt set, metric, target or model)
    carry another key and are ignored.  A line cut short by a kill (or otherwise unreadable) is
    moved to ``<file>.torn`` when the store opens, with one line saying so, and the file is
    rewritten without it: the next record starts on a line of its own instead of being glued to
    the fragment (which made it unreadable too).  The evaluation it held runs again.
    """

    def __init__(self, path: Path, eval_key: str, warn: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.eval_key = eval_key
        self._records: dict[Ignored, TrialRecord] = {}
        if not path.exists():
            return
        good, torn = [], []
        for line in path.read_bytes().splitlines(keepends=True):
            data = _parse_line(line) if line.endswith(b"\n") else None
            (good if data is not None else torn).append(line)
            if data is not None and data["eval_key"] == eval_key:
                record = TrialRecord.from_dict(data["record"])
                self._records[record.config] = record
        torn = [line for line in torn if line.strip()]
        if torn:
            self._set_aside(good, torn, warn or (lambda m: print(m, file=sys.stderr)))

    def _set_aside(self, good: list[bytes], torn: list[bytes], warn: Callable[[str], None]) -> None:
        side = self.path.with_name(self.path.name + ".torn")
        with open(side, "ab") as fh:
            fh.write(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in torn))
            fh.flush()
            os.fsync(fh.fileno())
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(b"".join(good))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        warn(f"{self.path}: {len(torn)} unreadable line(s) ({sum(map(len, torn))} bytes, a record "
             f"cut off by a kill) set aside in {side}; {'its' if len(torn) == 1 else 'their'} "
             "evaluation runs again")

    def get(self, config: Ignored) -> TrialRecord | None:
        return self._records.get(config)

    def add(self, record: TrialRecord) -> None:
        self._records[record.config] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"eval_key": self.eval_key, "record": record.to_dict()}) + "\n"
        with open(self.path, "ab") as fh:
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())

    def records(self) -> list[TrialRecord]:
        return list(self._records.values())


def config_digest(config: Ignored) -> str:
    """A short, filesystem-safe name for a configuration."""
    text = "bf16" if config is None else json.dumps(list(config))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TrialImages:
    """The images of every evaluation, as PNG under the cache, keyed by evaluation settings.

    The report draws its image grids from here, so no configuration is generated twice in a
    run.  A stopped evaluation holds only the prompts it generated.
    """

    def __init__(self, eval_key: str, cache_root: Path) -> None:
        self.root = cache_root / "trials" / eval_key

    def directory(self, config: Ignored) -> Path:
        return self.root / config_digest(config)

    def present(self, config: Ignored, names: list[str]) -> set[int]:
        """Indices into ``names`` of the images on disk for ``config``."""
        directory = self.directory(config)
        return {index for index, name in enumerate(names) if (directory / name).is_file()}

    def load(self, config: Ignored, names: list[str]) -> dict[int, np.ndarray]:
        """The images on disk for ``config``, by index into ``names``."""
        directory = self.directory(config)
        found = {}
        for index, name in enumerate(names):
            path = directory / name
            if path.is_file():
                try:
                    found[index] = load_png(path)
                except OSError:
                    continue  # a PNG cut short by a kill: left out
        return found

    def save(self, config: Ignored, name: str, image: np.ndarray) -> None:
        directory = self.directory(config)
        directory.mkdir(parents=True, exist_ok=True)
        save_png(image, directory / name)
