"""Resumable evaluation runs: per-example records appended to ``<out>/examples.jsonl`` as they finish.

A run folder holds:
- ``run.json``: the run's configuration and its fingerprint (a hash of everything that changes an example's result:
  the eval set and corpus, the limit, the options, the models and the retrieval, generation and ingest settings);
- ``examples.jsonl``: one line per finished example, ``{"stage": "retrieval" | "generation", "id", "example"}``,
  appended and flushed as soon as the example is done, so a run killed at any point loses at most the example in
  flight (a torn last line is dropped on reopen);
- ``report.json`` and ``report.html`` once the run finishes.

``RunState.open(folder, config)``: a new folder (or one without ``run.json``) starts a run; a folder whose
``run.json`` has the same fingerprint resumes it, and the runners skip the examples already recorded; a folder
holding another configuration's run is refused (``BadInputError`` naming the settings that differ) unless
``fresh=True``, which discards its records and starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mmrag.errors import BadInputError

logger = logging.getLogger(__name__)

__all__ = ["RunState", "fingerprint"]

RUN_FILE = "run.json"
EXAMPLES_FILE = "examples.jsonl"


def fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the configuration as canonical JSON."""
    canonical = json.dumps(config, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return found
    return [] if old == new else [prefix or "(all)"]


@dataclass
class RunState:
    """The examples a run has finished, by stage and id, and the appender for new ones."""

    folder: Path
    config: dict[str, Any]
    done: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    resumed: bool = False
    resumed_count: dict[str, int] = field(default_factory=dict)  # examples per stage found on opening

    @classmethod
    def open(cls, folder: Path, config: dict[str, Any], *, fresh: bool = False) -> "RunState":
        folder = Path(folder).expanduser().resolve()
        config = json.loads(json.dumps(config, default=str))  # what run.json will hold, compared as such
        digest = fingerprint(config)
        run_file, examples = folder / RUN_FILE, folder / EXAMPLES_FILE
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if run_file.is_file() and not fresh:
                try:
                    stored = json.loads(run_file.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as exc:
                    raise BadInputError(f"{run_file} is unreadable ({exc}); use another --out or add --fresh") from exc
                if stored.get("fingerprint") != digest:
                    differ = _differences(stored.get("config", {}), config)
                    raise BadInputError(
                        f"--out {str(folder)!r} holds a run with another configuration (differs in: "
                        f"{', '.join(differ[:6]) or 'its fingerprint'}); use another --out, or add --fresh to "
                        "discard that run and start over")
                state = cls(folder, config, resumed=True)
                state._load(examples)
                state.resumed_count = {stage: len(items) for stage, items in state.done.items()}
                return state
            if fresh and examples.exists():
                logger.info("--fresh: discarding %s", examples)
            for stale in (examples, folder / "report.json", folder / "report.html"):
                if stale.exists():
                    stale.unlink()
            run_file.write_text(json.dumps({"fingerprint": digest, "config": config,
                                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                                           indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise BadInputError(f"cannot use {str(folder)!r} as the run folder: {exc.strerror or exc}") from exc
        return cls(folder, config)

    def _load(self, path: Path) -> None:
        if not path.is_file():
            return
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line from a killed run: drop it, so appends start on a fresh line
            logger.info("dropping a torn last line of %s (%d bytes)", path, len(data) - end)
            with path.open("r+b") as handle:
                handle.truncate(end)
            data = data[:end]
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                self.done.setdefault(item["stage"], {})[str(item["id"])] = item["example"]
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s:%d is not a finished example; it will be run again", path, number)

    def finished(self, stage: str) -> dict[str, dict[str, Any]]:
        """Examples of ``stage`` recorded by earlier attempts of this run, by id."""
        return self.done.get(stage, {})

    def recorder(self, stage: str) -> Callable[[str, dict[str, Any]], None]:
        """A callback that appends one finished example of ``stage`` (flushed to the OS at once)."""
        path = self.folder / EXAMPLES_FILE

        def record(example_id: str, example: dict[str, Any]) -> None:
            line = json.dumps({"stage": stage, "id": example_id, "example": example}, ensure_ascii=False)
            with path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.done.setdefault(stage, {})[example_id] = example

        return record
