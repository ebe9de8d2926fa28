"""Training runs are exclusive per corpus, and a run's liveness survives pid reuse."""

from __future__ import annotations

import os
import threading

from engine import registry
from engine.errors import UserError
from engine.pipeline import process_started, recover_interrupted, run_alive


def corpus_with_version(db):
    corpus = registry.create_corpus(db, "notes", "/tmp/notes-folder")
    return corpus, registry.create_version(db, corpus["id"], "hash", [])


def test_two_runs_starting_at_once_get_one_run(db, cartridge_home):
    corpus, version = corpus_with_version(db)
    barrier, outcomes = threading.Barrier(2), []

    def start():
        own = registry.open_registry()  # each starter has its own connection, as two processes would
        barrier.wait()
        try:
            outcomes.append(registry.start_run(own, corpus["id"], version["id"], {}, pid=os.getpid(),
                                               pid_started=process_started(os.getpid())))
        except UserError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [o for o in outcomes if isinstance(o, int)]
    errors = [o for o in outcomes if isinstance(o, str)]
    assert len(ids) == 1 and len(errors) == 1 and "already training" in errors[0]
    assert [r["id"] for r in registry.list_runs(db, corpus["id"], status="running")] == ids


def test_a_reused_pid_does_not_keep_a_stale_run_alive(db, cartridge_home):
    corpus, version = corpus_with_version(db)
    me = os.getpid()
    live = registry.start_run(db, corpus["id"], version["id"], {}, pid=me, pid_started=process_started(me))
    assert run_alive(registry.get_run(db, live)) and recover_interrupted(db) == []
    registry.finish_run(db, live, "done")
    # A row left by a process that died before a reboot: its pid now belongs to another (live) process.
    stale = registry.start_run(db, corpus["id"], version["id"], {}, pid=me, pid_started=process_started(me) - 3600)
    assert not run_alive(registry.get_run(db, stale))
    assert recover_interrupted(db) == [stale]
    assert registry.get_run(db, stale)["status"] == "interrupted"
    # ... so it no longer blocks a new run.
    assert registry.start_run(db, corpus["id"], version["id"], {}, pid=me, pid_started=process_started(me)) > stale
