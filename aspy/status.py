"""Each worker's recording status, shared with the host's other workers through small files.

A worker's writer notes here whether its last write to the store succeeded, how many
exchanges wait, and the last error; ``/health``, answered by whichever worker the request
reaches, reads every living worker's note and so speaks for the whole host.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

# A note is rewritten at most this often while nothing changes but the number waiting.
REFRESH = 1.0


class WorkerStatus:
    """This worker's note: written by its writer, read by any worker's /health."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.failing = False
        self.written = 0.0

    def note(self, failing: bool, pending: int, failures: int, dropped: int, last_error: str | None) -> None:
        """Write the note when the state changes (and now and then while it holds); never raise."""
        now = time.time()
        if failing == self.failing and now - self.written < REFRESH:
            return
        self.failing, self.written = failing, now
        note = {"pid": os.getpid(), "failing": failing, "pending": pending, "failures": failures,
                "dropped": dropped, "last_error": last_error, "at": now}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{os.getpid()}.json"
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(note))
            temporary.replace(path)
        except OSError:
            pass  # a full disk: /health still has this worker's own figures


def host_status(folder: Path) -> list[dict[str, Any]]:
    """Return the notes of the workers of this host that are alive; forget the others'."""
    notes = []
    for path in folder.glob("*.json") if folder.is_dir() else []:
        try:
            note = json.loads(path.read_text())
            os.kill(int(note["pid"]), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        notes.append(note)
    return notes
