"""Background evaluation jobs: ``POST /v1/evals`` queues one, ``GET /v1/evals/{id}`` reports its status and report.

Jobs run one at a time on a worker thread through the eval runner (``eval.cli.eval_command``) with the app's loaded
models, each in the knowledge base of its own the runner opens. Each job belongs to the tenant that started it.
Reports are written under ``<data dir>/api-evals/<job id>/``, next to ``job.json``, the job's state, rewritten on
every change: another worker (``mmrag serve --workers N`` shares the data dir) or a restarted server reads it from
there. A job that was running when its process stopped stays "running" on disk.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from mmrag.api.errors import status_of
from mmrag.errors import MmragError

logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class EvalJob:
    id: str
    tenant: str
    dataset: str
    folder: Path
    status: str = "queued"
    created: str = field(default_factory=_now)
    started: str | None = None
    finished: str | None = None
    error: dict[str, str] | None = None
    summary: dict[str, Any] | None = None

    def files(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir()
                      if p.is_file() and not p.name.startswith(".") and p.name != "job.json")

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"id": self.id, "tenant": self.tenant, "dataset": self.dataset, "status": self.status,
                 "created": self.created, "started": self.started, "finished": self.finished, "error": self.error,
                 "summary": self.summary}
        tmp = self.folder / f".job.{secrets.token_hex(4)}.tmp"
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, self.folder / "job.json")

    @classmethod
    def load(cls, folder: Path) -> "EvalJob | None":
        try:
            state = json.loads((folder / "job.json").read_text(encoding="utf-8"))
            return cls(folder=folder, **state)
        except (OSError, ValueError, TypeError):
            return None

    def to_json(self, with_report: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "status": self.status, "dataset": self.dataset,
                                "created": self.created, "started": self.started, "finished": self.finished,
                                "error": self.error, "summary": self.summary, "files": self.files()}
        if with_report and self.status == "done":
            report = self.folder / "report.json"
            data["report"] = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else None
        return data


class EvalJobs:
    def __init__(self, root: Path, run: Callable[[EvalJob, dict[str, Any]], dict[str, Any]]) -> None:
        self.root = root
        self._run = run
        self._jobs: dict[str, EvalJob] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmrag-eval")

    def submit(self, tenant: str, dataset: str, options: dict[str, Any]) -> EvalJob:
        job_id = secrets.token_hex(12)
        job = EvalJob(job_id, tenant, dataset, self.root / job_id)
        with self._lock:
            self._jobs[job_id] = job
        job.save()
        self._pool.submit(self._execute, job, options)
        return job

    def get(self, job_id: str, tenant: str) -> EvalJob | None:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None and job_id.isalnum():  # started by another worker, or before a restart
            job = EvalJob.load(self.root / job_id)
        return job if job is not None and job.tenant == tenant else None

    def list(self, tenant: str) -> list[EvalJob]:
        with self._lock:
            jobs = dict(self._jobs)
        if self.root.is_dir():
            for folder in self.root.iterdir():
                if folder.name not in jobs and (folder / "job.json").is_file():
                    loaded = EvalJob.load(folder)
                    if loaded is not None:
                        jobs[loaded.id] = loaded
        return sorted((j for j in jobs.values() if j.tenant == tenant), key=lambda j: j.created)

    def _execute(self, job: EvalJob, options: dict[str, Any]) -> None:
        job.status, job.started = "running", _now()
        job.save()
        try:
            job.summary = self._run(job, options)
            job.status = "done"
        except MmragError as exc:
            _, code = status_of(exc)
            job.error, job.status = {"code": code, "message": str(exc)}, "failed"
        except Exception as exc:  # noqa: BLE001 - a job fails with a message; the trace goes to the log only
            logger.exception("eval job %s failed", job.id)
            job.error, job.status = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}, "failed"
        finally:
            job.finished = _now()
            job.save()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
