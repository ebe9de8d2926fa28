"""A background training queue: one job at a time, in a worker thread that outlives any browser tab.

The UI and the folder watcher both submit here. A job queued for a corpus that already has one waiting
is coalesced into it (the newest settings win, except that a watcher's never replace a user's), so a
burst of changes gives one retrain.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from engine.training import pipeline
from engine.store import registry
from engine.errors import UserError


@dataclass
class Job:
    id: int
    corpus: str
    kwargs: dict
    source: str = "user"  # user | watch
    state: str = "queued"  # queued | running | done | failed | cancelled
    progress: pipeline.Progress | None = None
    history: list[dict] = field(default_factory=list)  # training steps: {"step", "loss", "tokens_per_s"}
    outcome: dict | None = None
    error: str | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict:
        progress = self.progress
        return {"id": self.id, "corpus": self.corpus, "source": self.source, "state": self.state,
                "phase": progress.phase if progress else None, "done": progress.done if progress else 0,
                "total": progress.total if progress else 0, "eta_s": progress.eta_s if progress else None,
                "rate": progress.rate if progress else None, "loss": progress.loss if progress else None,
                "message": progress.message if progress else "", "outcome": self.outcome, "error": self.error,
                "submitted": self.submitted, "started": self.started, "finished": self.finished}


def _same_target(a: dict, b: dict) -> bool:
    """Whether two jobs of a corpus train the same thing: the same version (None: the newest), neither a resume
    (which continues a run of its own). Only those are merged, so a retrain of a new version is never lost in
    a queued retrain of an older one."""
    return a.get("version") == b.get("version") and not a.get("resume") and not b.get("resume")


class TrainingQueue:
    """Jobs run one at a time in submission order. A paused queue keeps accepting (and coalescing) jobs
    and starts none until resumed; the running one, if any, goes on."""

    def __init__(self, db_path=None, *, paused: bool = False):
        self._db_path = db_path
        self.paused = paused
        self._lock = threading.Condition()
        self._queue: deque[Job] = deque()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self.current: Job | None = None
        self._worker = threading.Thread(target=self._run, name="training-queue", daemon=True)
        self._worker.start()

    def submit(self, corpus: str, source: str = "user", **kwargs) -> Job:
        with self._lock:
            for job in self._queue:
                if job.corpus == corpus and _same_target(job.kwargs, kwargs):
                    # One retrain covers both. The user's own settings win over a watcher's.
                    if source == "user" or job.source == "watch":
                        job.kwargs, job.source = kwargs, source
                    return job
            job = Job(next(self._ids), corpus, kwargs, source)
            self._queue.append(job)
            self._jobs[job.id] = job
            self._lock.notify_all()
            return job

    def pause(self) -> None:
        with self._lock:
            self.paused = True

    def resume(self) -> None:
        with self._lock:
            self.paused = False
            self._lock.notify_all()

    def cancel(self, job_id: int | None = None) -> bool:
        """Stop the running job (or drop a queued one); the stopped run can be resumed later."""
        with self._lock:
            job = self.current if job_id is None else self._jobs.get(job_id)
            if job is None or job.state not in ("queued", "running"):
                return False
            if job.state == "queued":
                self._queue.remove(job)
                job.state, job.finished = "cancelled", time.time()
            else:
                job.stop.set()
            self._lock.notify_all()
            return True

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.id)

    def busy_corpora(self) -> set[str]:
        with self._lock:
            return {j.corpus for j in self._jobs.values() if j.state in ("queued", "running")}

    def wait(self, job_id: int, timeout: float | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            job = self._jobs[job_id]
            while job.state in ("queued", "running"):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._lock.wait(remaining)
            return job

    def _run(self) -> None:
        db = registry.open_registry(self._db_path)
        while True:
            with self._lock:
                while not self._queue or self.paused:
                    self._lock.wait()
                job = self._queue.popleft()
                job.state, job.started, self.current = "running", time.time(), job

            def on_progress(progress: pipeline.Progress, job=job) -> None:
                job.progress = progress
                if progress.phase == "training":
                    job.history.append({"step": progress.done, "loss": progress.loss, "tokens_per_s": progress.rate})

            try:
                # A retrain the watcher started must not replace a clearly better serving version.
                outcome = pipeline.train(db, job.corpus, on_progress=on_progress, should_stop=job.stop.is_set,
                                         guard_current=job.source == "watch", **job.kwargs)
                state = "done" if outcome is not None else "cancelled"
                job.outcome = outcome.to_json() if outcome is not None else None
            except UserError as exc:
                state, job.error = "failed", str(exc)
            except Exception as exc:  # a bug: keep the worker alive and record what happened
                state, job.error = "failed", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            with self._lock:
                job.state, job.finished, self.current = state, time.time(), None
                self._lock.notify_all()
