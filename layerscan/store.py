"""Every evaluated configuration, appended to a JSON-lines file the moment it finishes.

This is what makes a run resumable and Ctrl-C safe: a line is written (and flushed to disk)
per finished evaluation, and a rerun reads the file back instead of evaluating again.  Records
made under different evaluation settings (another prompt set, metric or model) carry another
key and are ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from layerscan.engine import Ignored
from layerscan.evaluate import TrialRecord


class TrialStore:
    def __init__(self, path: Path, eval_key: str) -> None:
        self.path = path
        self.eval_key = eval_key
        self._records: dict[Ignored, TrialRecord] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill: that evaluation simply reruns
                if data.get("eval_key") == eval_key:
                    record = TrialRecord.from_dict(data["record"])
                    self._records[record.config] = record

    def get(self, config: Ignored) -> TrialRecord | None:
        return self._records.get(config)

    def add(self, record: TrialRecord) -> None:
        self._records[record.config] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"eval_key": self.eval_key, "record": record.to_dict()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def records(self) -> list[TrialRecord]:
        return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)
