"""Folder watch: keep each watched corpus's cartridge in step with its folder.

Per watched corpus, a watchdog observer on the folder notes the paths that can matter to the corpus
(the same ignore rules, `.gitignore` files and secret names as `ingest`). Once the folder has been
quiet for a while (or a change has waited the maximum wait, for folders that never go quiet) and the
changed files have stopped growing, the folder is rescanned with `ingest`,
which records a new version only when the manifest (paths + content hashes) changed; that version's
incremental retrain goes to the shared `TrainingQueue`. Chat keeps using the current version, which
moves to the new one only when its retrain has finished.

Watchers miss events (full inotify tables, network drives, changes made while the app was closed), so
every folder is also rescanned at start and every few minutes. Changes that arrive while a corpus is
training wait, and become one retrain after it. A failed retrain is retried with growing back-off. The
per-corpus switch lives in the registry
(`corpora.watch`), so `start_watchers` picks the same corpora up again after a restart.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from pathlib import Path

from watchdog.events import FileSystemEventHandler

from engine.training import pipeline
from engine.store import registry
from engine.errors import UserError
from engine.corpus.ingest import ScanOptions, ingest
from engine.store.paths import app_paths
from engine.corpus.rules import IgnoreRules, is_secret

DEFAULT_QUIET_SECONDS = 60.0
DEFAULT_RESCAN_SECONDS = 600.0
DEFAULT_MAX_WAIT_SECONDS = 600.0  # a change is acted on within this long even while files keep changing
DEFAULT_RETRY_SECONDS = 60.0  # first retry of a failed retrain; doubles per failure ...
MAX_RETRY_SECONDS = 3600.0  # ... up to this
TICK_SECONDS = 0.2
UNTRAINED = ("scanned", "interrupted", "training")  # version states a watch trains without a new change
MAX_LOOKED_AT = 200  # files whose size is compared between two looks (the most recently changed ones)

# Event types that can change what a folder holds. Opened / closed-without-write events (ingest's own
# reads among them) and directory modified/attrib events (echoes of the file events) are left out.
_FILE_EVENTS = ("created", "modified", "attrib", "deleted", "moved", "closed")
_DIR_EVENTS = ("created", "deleted", "moved")


class EventFilter:
    """Whether a path under the root can matter to the corpus: ingest's rules, applied to one path.

    A directory's rules (built-ins + the corpus's patterns + the `.gitignore` of it and its ancestors)
    are built once and cached; a changed `.gitignore` clears the cache.
    """

    def __init__(self, root: Path, ignore: list[str], allow_secrets: bool = False,
                 exclude: list[Path] | None = None):
        self.root = Path(root)
        self.ignore = list(ignore)
        self.allow_secrets = allow_secrets
        self.exclude = [Path(p) for p in exclude or []]
        self._lock = threading.Lock()
        self._rules: dict[str, IgnoreRules | None] = {}  # relative dir -> its rules, None when excluded

    def configure(self, ignore: list[str], allow_secrets: bool) -> None:
        with self._lock:
            if list(ignore) != self.ignore or allow_secrets != self.allow_secrets:
                self.ignore, self.allow_secrets = list(ignore), allow_secrets
                self._rules.clear()

    def relative(self, path: str) -> str | None:
        """`/`-separated path relative to the root ("" for the root), or None outside it."""
        absolute = Path(os.path.normpath(path))
        if any(absolute == p or p in absolute.parents for p in self.exclude):
            return None
        try:
            rel = absolute.relative_to(self.root)
        except ValueError:
            return None
        return rel.as_posix() if rel.parts else ""

    def relevant(self, path: str, is_dir: bool = False) -> str | None:
        """The relative path when a change to `path` can change the corpus, else None."""
        rel = self.relative(path)
        if rel is None or rel == "":
            return rel
        parent, _, name = rel.rpartition("/")
        with self._lock:
            if name == ".gitignore":
                self._rules.clear()
            rules = self._rules_in(parent)
            if rules is None or rules.ignored(rel, is_dir=is_dir):
                return None
        if not is_dir and not self.allow_secrets and is_secret(rel):
            return None
        return rel

    def _rules_in(self, rel_dir: str) -> IgnoreRules | None:
        if rel_dir in self._rules:
            return self._rules[rel_dir]
        rules: IgnoreRules | None
        if rel_dir:
            parent = rel_dir.rpartition("/")[0]
            parent_rules = self._rules_in(parent)
            excluded = parent_rules is None or parent_rules.ignored(rel_dir, is_dir=True)
            rules = None if excluded else self._build(rel_dir)
        else:
            rules = self._build("")
        self._rules[rel_dir] = rules
        return rules

    def _build(self, rel_dir: str) -> IgnoreRules:
        rules = IgnoreRules(extra=self.ignore)
        parts = rel_dir.split("/") if rel_dir else []
        for depth in range(len(parts) + 1):
            base = "/".join(parts[:depth])
            gitignore = self.root / base / ".gitignore"
            try:
                lines = gitignore.read_text(errors="replace").splitlines()
            except OSError:
                continue
            rules.add_gitignore(base, lines)
        return rules


class _Handler(FileSystemEventHandler):
    """Relevant paths go to the corpus watch (runs on the observer's thread)."""

    def __init__(self, watch: "CorpusWatch"):
        super().__init__()
        self.watch = watch

    def dispatch(self, event) -> None:
        kinds = _DIR_EVENTS if event.is_directory else _FILE_EVENTS
        if event.event_type not in kinds:
            return
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        for path in filter(None, paths):
            path = os.fsdecode(path)
            rel = self.watch.filter.relevant(path, is_dir=event.is_directory)
            if rel is not None:
                self.watch.note(rel, event.event_type)


class CorpusWatch:
    """One watched corpus: its observer, the changes not yet acted on, and what it last did."""

    def __init__(self, corpus: dict, quiet_seconds: float, rescan_seconds: float,
                 max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS, retry_seconds: float = DEFAULT_RETRY_SECONDS):
        self.corpus_id = corpus["id"]
        self.name = corpus["name"]
        self.root = Path(corpus["root"])
        self.quiet_seconds = quiet_seconds
        self.settle_seconds = max(TICK_SECONDS, min(1.0, quiet_seconds / 2))
        self.rescan_seconds = rescan_seconds
        self.max_wait_seconds = max(quiet_seconds, max_wait_seconds)
        self.retry_seconds = retry_seconds
        self.failures = 0  # retrains failed in a row
        self.retry_at: float | None = None  # monotonic time of the next retry of a failed retrain
        self.filter = EventFilter(self.root, corpus["ignore"], corpus["options"].get("allow_secrets", False),
                                  exclude=app_paths())
        self.observer = None
        self.mode = "starting"  # events | rescans only
        self._lock = threading.Lock()
        self.pending: dict[str, tuple[str, float]] = {}  # relative path -> (event type, wall time)
        self.last_activity: float | None = None  # monotonic time of the newest relevant event
        self.first_pending: float | None = None  # monotonic time of the oldest change not acted on
        self.looks: dict[str, tuple[int, int] | None] | None = None  # sizes at the first look
        self.look_at = 0.0
        self.next_rescan = 0.0  # monotonic; 0: reconcile at the first tick
        self.submitted: set[int] = set()  # versions whose retrain this watch queued
        self.state = "starting"
        self.message = ""
        self.job = None
        self.events_read = 0.0  # monotonic time last_event was refreshed from the registry
        self.last_event: dict | None = None
        self.last_check: float | None = None
        self.checks = 0
        self.error: str | None = None

    # -- observer --------------------------------------------------------------------------------

    def start_observer(self) -> str | None:
        """Start the folder observer; returns why it could not start (then rescans alone keep watch)."""
        from watchdog.observers import Observer

        self.stop_observer()
        observer = Observer()
        try:
            observer.schedule(_Handler(self), str(self.root), recursive=True)
            observer.start()
        except (OSError, RuntimeError) as exc:
            try:
                observer.stop()
            except Exception:
                pass
            self.mode = "rescans only"
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            if getattr(exc, "errno", None) == 28:  # ENOSPC: the inotify watch limit
                reason = "too many folders for the system's file-watch limit (fs.inotify.max_user_watches)"
            return reason
        self.observer, self.mode = observer, "events"
        return None

    def observer_alive(self) -> bool:
        """True while events still flow (an emitter stops by itself when the folder is deleted)."""
        observer = self.observer
        if observer is None or not observer.is_alive():
            return False
        emitters = observer.emitters
        return bool(emitters) and all(emitter.is_alive() for emitter in emitters)

    def stop_observer(self) -> None:
        observer, self.observer = self.observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    # -- changes ---------------------------------------------------------------------------------

    def due(self) -> float:
        """Monotonic time the pending changes are acted on: after the quiet period, or the maximum wait."""
        return min(self.last_activity + self.quiet_seconds, self.first_pending + self.max_wait_seconds)

    def note(self, rel: str, kind: str) -> None:
        with self._lock:
            if not self.pending:
                self.first_pending = time.monotonic()
            self.pending[rel] = (kind, time.time())
            self.last_activity = time.monotonic()
            self.looks = None

    def take_pending(self) -> dict[str, tuple[str, float]]:
        with self._lock:
            pending, self.pending, self.looks, self.last_activity = self.pending, {}, None, None
            self.first_pending = None
            return pending

    def restore_pending(self, pending: dict[str, tuple[str, float]]) -> None:
        with self._lock:
            for rel, value in pending.items():
                self.pending.setdefault(rel, value)
            if self.pending and self.last_activity is None:
                self.last_activity = time.monotonic()
            if self.pending and self.first_pending is None:
                self.first_pending = time.monotonic()

    def sizes(self) -> dict[str, tuple[int, int] | None]:
        """(size, mtime) of the most recently changed pending files; None for a missing one."""
        with self._lock:
            newest = sorted(self.pending, key=lambda rel: self.pending[rel][1])[-MAX_LOOKED_AT:]
        looks: dict[str, tuple[int, int] | None] = {}
        for rel in newest:
            try:
                st = os.stat(self.root / rel)
                looks[rel] = (st.st_size, st.st_mtime_ns)
            except OSError:
                looks[rel] = None
        return looks

    def next_check(self) -> float:
        """Monotonic time of the next scheduled look at the folder."""
        with self._lock:
            if self.pending and self.last_activity is not None:
                if self.looks is not None:
                    return self.look_at + self.settle_seconds
                return self.due()
        if self.retry_at is not None:
            return min(self.retry_at, self.next_rescan)
        return self.next_rescan

    def status(self) -> dict:
        now_mono, now = time.monotonic(), time.time()
        with self._lock:
            pending = sorted(self.pending)
        next_check = now + max(0.0, self.next_check() - now_mono)
        return {
            "corpus": self.name, "root": str(self.root), "mode": self.mode, "watching": self.observer_alive(),
            "state": self.state, "message": self.message, "pending": len(pending), "pending_paths": pending[:20],
            "next_check": next_check, "last_check": self.last_check, "checks": self.checks,
            "last_event": self.last_event, "job": self.job.to_json() if self.job is not None else None,
            "error": self.error,
        }


class WatchService:
    """Watches corpora and queues their retrains; one scheduler thread for all of them.

    Training arguments (preset, p, conversations, ...) are passed to every retrain it queues.
    """

    def __init__(self, queue, db_path=None, *, quiet_seconds: float = DEFAULT_QUIET_SECONDS,
                 rescan_seconds: float = DEFAULT_RESCAN_SECONDS, max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS,
                 retry_seconds: float = DEFAULT_RETRY_SECONDS, **train_kwargs):
        if quiet_seconds < 0 or rescan_seconds <= 0 or max_wait_seconds <= 0 or retry_seconds <= 0:
            raise UserError("--quiet-seconds must be >= 0; --rescan-seconds and --max-wait-seconds > 0")
        self.queue = queue
        self.db_path = db_path
        self.quiet_seconds = float(quiet_seconds)
        self.rescan_seconds = float(rescan_seconds)
        self.max_wait_seconds = float(max_wait_seconds)
        self.retry_seconds = float(retry_seconds)
        self.train_kwargs = {k: v for k, v in train_kwargs.items() if v is not None}
        self._db = registry.open_registry(db_path)  # the scheduler thread's own connection
        self._watches: dict[int, CorpusWatch] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="folder-watch", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------

    def watch(self, corpus: str) -> dict:
        """Start watching a corpus (by name) and switch its watch flag on; returns its status."""
        db = registry.open_registry(self.db_path)
        try:
            row = set_watch(db, corpus, True)
            latest = registry.list_events(db, row["id"], limit=1)
        finally:
            db.close()
        with self._lock:
            if row["id"] in self._watches:
                return self._watches[row["id"]].status()
            watch = CorpusWatch(row, self.quiet_seconds, self.rescan_seconds, self.max_wait_seconds,
                                self.retry_seconds)
            watch.last_event = _brief(latest[0]) if latest else None
            self._watches[row["id"]] = watch
        problem = watch.start_observer()
        if problem:
            self._event(None, watch, "watch_degraded",
                        f"cannot follow changes in {watch.root} as they happen ({problem}); rescanning "
                        f"every {self.rescan_seconds:.0f} s instead")
        return watch.status()

    def unwatch(self, corpus: str) -> None:
        """Stop watching a corpus and switch its watch flag off."""
        db = registry.open_registry(self.db_path)
        try:
            row = set_watch(db, corpus, False)
        finally:
            db.close()
        with self._lock:
            watch = self._watches.pop(row["id"], None)
        if watch is not None:
            watch.stop_observer()

    def stop(self) -> None:
        """Stop every observer and the scheduler; the watch flags stay as they are."""
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            watches, self._watches = list(self._watches.values()), {}
        for watch in watches:
            watch.stop_observer()

    def watched(self) -> list[str]:
        with self._lock:
            return sorted(w.name for w in self._watches.values())

    def status(self, corpus: str | None = None):
        """Per-corpus status for the UI: state, pending changes, next check time, last event, job.

        With a name, that corpus's status (None when it is not watched); else a list of all.
        """
        with self._lock:
            watches = list(self._watches.values())
        if corpus is not None:
            return next((w.status() for w in watches if w.name == corpus), None)
        return [w.status() for w in sorted(watches, key=lambda w: w.name)]

    # -- scheduler -------------------------------------------------------------------------------

    def _run(self) -> None:
        db = self._db
        try:
            while not self._stop.wait(TICK_SECONDS):
                with self._lock:
                    watches = list(self._watches.values())
                for watch in watches:
                    if self._stop.is_set():
                        break
                    try:
                        self._step(db, watch)
                    except Exception as exc:  # a bug must not end the watch of every corpus
                        traceback.print_exc()
                        watch.state, watch.error = "error", f"{type(exc).__name__}: {exc}"
                        watch.next_rescan = time.monotonic() + self.rescan_seconds
        finally:
            db.close()

    def _step(self, db, watch: CorpusWatch) -> None:
        now = time.monotonic()
        self._follow_job(db, watch, now)
        if self._training(watch):
            watch.state = "training"
            return
        with watch._lock:
            pending = bool(watch.pending)
            quiet = pending and now >= watch.due()
            overdue = pending and now >= watch.first_pending + watch.max_wait_seconds
            looks, look_at = watch.looks, watch.look_at
        if quiet and overdue:
            self._check(db, watch, watch.take_pending())  # the folder never goes quiet: act on what is there
        elif quiet:
            # Two looks at the changed files' sizes: a file still being written waits.
            if looks is None:
                first = watch.sizes()
                with watch._lock:
                    if watch.looks is None and watch.pending:
                        watch.looks, watch.look_at = first, now
                watch.state, watch.message = "settling", "checking that the changed files are complete"
                return
            if now < look_at + watch.settle_seconds:
                return
            second = watch.sizes()
            if second != looks:
                with watch._lock:
                    watch.looks, watch.look_at = second, now
                growing = sorted(rel for rel in second if second[rel] != looks.get(rel))
                watch.state = "settling"
                watch.message = f"waiting for {growing[0]} to finish writing" if growing else ""
                return
            self._check(db, watch, watch.take_pending())
        elif pending:
            watch.state, watch.message = "waiting", "waiting for the folder to be quiet"
        elif watch.retry_at is not None and now >= watch.retry_at:
            self._retry(db, watch)
        elif now >= watch.next_rescan:
            self._check(db, watch, {})
        elif watch.state not in ("queued", "error", "failed"):
            watch.state = "idle"

    def _training(self, watch: CorpusWatch) -> bool:
        current = getattr(self.queue, "current", None)
        return current is not None and current.corpus == watch.name and current.state == "running"

    def _follow_job(self, db, watch: CorpusWatch, now: float) -> None:
        """Follow the retrain this watch queued; record a failure the pipeline had no run to record on."""
        job = watch.job
        if job is None:
            return
        if job.state in ("queued", "running"):
            watch.state = "queued" if job.state == "queued" else "training"
            if now >= watch.events_read + 1.0:  # the pipeline records started / finished / failed
                watch.events_read = now
                latest = registry.list_events(db, watch.corpus_id, limit=1)
                watch.last_event = _brief(latest[0]) if latest else watch.last_event
            return
        watch.job = None
        events = registry.list_events(db, watch.corpus_id, limit=20)
        if job.state == "failed" and not any(e["kind"] == "train_failed" and e["created"] >= (job.started or 0)
                                             for e in events):
            self._event(db, watch, "train_failed", f"retrain failed: {job.error}")
        elif events:
            watch.last_event = _brief(events[0])
        watch.state = "failed" if job.state == "failed" else "idle"
        watch.message = (f"v{job.outcome['version']} is ready" if job.state == "done" and job.outcome
                         else job.error or job.state)
        if job.state == "failed":
            watch.failures += 1
            wait = min(MAX_RETRY_SECONDS, watch.retry_seconds * 2 ** (watch.failures - 1))
            watch.retry_at = now + wait
            watch.message += f"; retrying in {wait:.0f} s"
        else:
            watch.failures, watch.retry_at = 0, None

    def _retry(self, db, watch: CorpusWatch) -> None:
        """Queue the failed version's retrain again (unless something since made it moot)."""
        watch.retry_at = None
        version = registry.latest_version(db, watch.corpus_id)
        if version is None or version["status"] == "ready" or watch.name in self.queue.busy_corpora():
            watch.failures = 0
            return
        self._submit(db, watch, version, f"retry {watch.failures} after a failure")

    def _check(self, db, watch: CorpusWatch, pending: dict) -> None:
        """Rescan the folder; queue a retrain when the manifest changed (or, at start, when untrained)."""
        now = time.monotonic()
        watch.state, watch.message = "checking", "scanning the folder"
        corpus = next((c for c in registry.list_corpora(db) if c["id"] == watch.corpus_id), None)
        if corpus is None or not corpus["watch"]:
            # Forgotten, or switched off elsewhere (another process): stop here.
            with self._lock:
                self._watches.pop(watch.corpus_id, None)
            watch.stop_observer()
            return
        watch.name = corpus["name"]
        pipeline.recover_interrupted(db)
        if registry.list_runs(db, corpus["id"], status="running"):
            # Training in another process (or outside the queue): wait for it, keep the changes.
            watch.restore_pending(pending)
            watch.state, watch.message = "waiting", "the corpus is training elsewhere"
            watch.next_rescan = now + max(self.quiet_seconds, 5.0)
            return
        watch.filter.configure(corpus["ignore"], ScanOptions(**corpus["options"]).allow_secrets)
        before = registry.latest_version(db, corpus["id"])
        try:
            result = ingest(corpus["root"], db=db)
        except (UserError, OSError) as exc:
            message = str(exc)
            if message != watch.error:
                self._event(db, watch, "watch_error", f"cannot scan the folder: {message}")
            watch.state, watch.message, watch.error = "error", message, message
            watch.next_rescan = now + min(self.rescan_seconds, max(self.quiet_seconds, 5.0))
            return
        watch.error = None
        watch.last_check, watch.checks = time.time(), watch.checks + 1
        watch.next_rescan = time.monotonic() + self.rescan_seconds
        if not watch.observer_alive():
            watch.start_observer()  # the folder came back, or its observer stopped: follow it again
        version = result.version
        if result.changed:
            diff = _manifest_diff(db, before, version)
            self._event(db, watch, "change_seen", f"v{version['number']}: {_describe(diff)}", diff)
            self._submit(db, watch, version, "the folder changed")
        elif (version["status"] in UNTRAINED and version["number"] not in watch.submitted
              and watch.name not in self.queue.busy_corpora()):
            # Recorded but never trained here: left by a killed run, or ingested by another command.
            self._submit(db, watch, version, f"v{version['number']} has no trained cartridge yet")
        else:
            watch.state = "idle"
            watch.message = "no content change" if pending else "up to date"

    def _submit(self, db, watch: CorpusWatch, version: dict, why: str) -> None:
        job = self.queue.submit(watch.name, source="watch", **self.train_kwargs)
        watch.job = job
        watch.submitted.add(version["number"])
        self._event(db, watch, "retrain_queued", f"retrain of v{version['number']} queued ({why})",
                    {"job": job.id, "version": version["number"]})
        # after the event: whoever sees the state "queued" also sees the event that says why
        watch.state, watch.message = "queued", f"retrain of v{version['number']} queued"

    def _event(self, db, watch: CorpusWatch, kind: str, message: str, data: dict | None = None) -> None:
        own = db is None
        db = registry.open_registry(self.db_path) if own else db
        try:
            registry.add_event(db, watch.corpus_id, kind, message, data)
        finally:
            if own:
                db.close()
        watch.last_event = {"kind": kind, "message": message, "created": time.time()}


def _brief(event: dict) -> dict:
    return {"kind": event["kind"], "message": event["message"], "created": event["created"]}


def _manifest_diff(db, before: dict | None, after: dict) -> dict:
    old = {f["path"]: f["sha256"] for f in registry.version_files(db, before["id"])} if before else {}
    new = {f["path"]: f["sha256"] for f in registry.version_files(db, after["id"])}
    return {"added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)),
            "changed": sorted(p for p in set(old) & set(new) if old[p] != new[p])}


def _describe(diff: dict) -> str:
    parts = []
    for key in ("changed", "added", "removed"):
        paths = diff[key]
        if paths:
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            parts.append(f"{len(paths)} {key} ({shown})")
    return "; ".join(parts) or "no file changes"


def set_watch(db, corpus: str, on: bool) -> dict:
    """Switch a corpus's watch flag (remembered in the registry); returns the corpus."""
    row = registry.get_corpus(db, corpus)
    if row["watch"] != on:
        registry.update_corpus(db, row["id"], watch=on)
        registry.add_event(db, row["id"], "watch_on" if on else "watch_off",
                           f"watching {row['root']} for changes" if on else "no longer watching for changes")
    return registry.get_corpus(db, corpus)


def start_watchers(queue, db_path=None, **kwargs) -> WatchService:
    """Recover runs a dead process left behind, then watch every corpus whose watch flag is on.

    `kwargs`: quiet_seconds, rescan_seconds, max_wait_seconds, retry_seconds, and training arguments for the
    retrains (preset, p, ...).
    """
    db = registry.open_registry(db_path)
    try:
        pipeline.recover_interrupted(db)
        names = [c["name"] for c in registry.list_corpora(db) if c["watch"]]
    finally:
        db.close()
    service = WatchService(queue, db_path, **kwargs)
    for name in names:
        service.watch(name)
    return service
