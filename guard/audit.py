"""The audit log: one JSON line per flagged or abstained answer, durable and whole.

Each record is serialised first, then written by a single ``os.write`` on a file opened
with ``O_APPEND``, under a lock, and fsynced: readers never see a partial line, and the
line survives a crash once `AuditLog.write` has returned.

    audit = AuditLog(Path("audit.jsonl"))
    audit.write({"request_id": "abc", "risk": 0.93, "decision": "abstain", ...})
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from guard.errors import GuardError


class AuditLog:
    """Append-only JSONL audit file, safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            except OSError as exc:
                raise GuardError(
                    f"cannot open the audit log {self.path}: {exc}; fix GUARD_AUDIT_LOG"
                ) from exc
        return self._fd

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a ``time`` field is added when missing) as one line."""
        payload = {"time": datetime.now(UTC).isoformat(), **record}
        line = (json.dumps(payload, ensure_ascii=False, sort_keys=True) + "\n").encode()
        with self._lock:
            fd = self._open()
            written = 0
            while written < len(line):  # one write normally; loop only on a short write
                written += os.write(fd, line[written:])
            os.fsync(fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
