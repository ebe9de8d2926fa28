"""Training, chat and the folder watcher at once in one process, as in the app: the shared model and
tokenizer give every chat the answer it gives alone, and every job finishes."""

from __future__ import annotations

import shutil
import threading
import time

from conftest import ASSETS, write
from engine.training import pipeline
from engine.store import registry
from engine.corpus.ingest import ingest
from engine.serve.inference import open_chat
from engine.jobs.queue import TrainingQueue
from engine.jobs.watcher import start_watchers

TINY = dict(p=16, conversations=4, steps=6, batch_size=2, chunk_tokens=96, max_answer_tokens=16, max_user_tokens=48,
            init="spread")
QUESTION = [{"role": "user", "content": "When is the workshop closed?"}]


def test_training_chat_and_watcher_together(tmp_path, cartridge_home):
    db = registry.open_registry()
    ingest(ASSETS / "sample", db=db)
    pipeline.train(db, "sample", **TINY)
    chats = {engine: open_chat(db, ["sample"], version=1, engine=engine) for engine in ("torch", "llama.cpp")}
    alone = {engine: chat.reply(QUESTION, max_new_tokens=16).answer for engine, chat in chats.items()}

    other = tmp_path / "other"
    shutil.copytree(ASSETS / "sample", other)
    ingest(other, name="other", db=db)
    watched = tmp_path / "watched"
    write(watched, "tides.md", "The Harbour Office posts the tide table every Sunday at noon.\n" * 12)
    corpus = ingest(watched, name="watched", db=db).corpus
    registry.update_corpus(db, corpus["id"], watch=True)

    queue = TrainingQueue()
    service = start_watchers(queue, quiet_seconds=0.5, **TINY)  # queues "watched" (untrained) at once
    job = queue.submit("other", **TINY)
    answers, errors = [], []

    def chat_while_training():
        try:
            while queue.busy_corpora():
                for engine, chat in chats.items():
                    answers.append((engine, chat.reply(QUESTION, max_new_tokens=16).answer))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=chat_while_training)]  # the UI runs one generation at a time
    try:
        time.sleep(0.5)
        for thread in threads:
            thread.start()
        write(watched, "tides.md", "The Harbour Office posts the tide table every Monday at nine.\n" * 12)
        queue.wait(job.id, timeout=900)
        deadline = time.monotonic() + 900
        while (registry.latest_version(db, corpus["id"])["status"] != "ready" or queue.busy_corpora()) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        for thread in threads:
            thread.join(timeout=300)
    finally:
        service.stop()
    assert not errors, errors
    assert job.state == "done", job.error
    assert [j.state for j in queue.jobs() if j.corpus == "watched"][-1] == "done"
    assert registry.latest_version(db, corpus["id"])["number"] == 2  # the watcher's edit was trained too
    assert answers and {engine for engine, _ in answers} == {"torch", "llama.cpp"}
    for engine, answer in answers:
        assert answer == alone[engine], (engine, answer, alone[engine])
