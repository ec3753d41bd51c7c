"""Append-only JSON-lines files that survive a kill: what `racro-fast eval` resumes from."""
from __future__ import annotations

import json
import os
from pathlib import Path


class JsonlStore:
    """Append-only JSONL that survives being killed mid-write: a torn last line is dropped on open."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        if path.exists():
            raw = path.read_bytes()
            good = []
            for line in raw.decode("utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    good.append(rec)
            self.records = good
            if raw and (not raw.endswith(b"\n") or len(good) != raw.count(b"\n")):
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good), encoding="utf-8")
                os.replace(tmp, path)
        self._f = open(path, "a", encoding="utf-8")

    def append(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        self.records.append(rec)

    def close(self) -> None:
        self._f.close()
