"""Training runs are exclusive per corpus, and a run's liveness survives pid reuse."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from engine.training import pipeline
from engine.store import registry
from engine.errors import UserError
from engine.training.pipeline import process_started, recover_interrupted, run_alive


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
    # The wall clock was set by a few seconds since (start times move with it): still the same process.
    assert run_alive({"pid": me, "pid_started": process_started(me) + 3.0})
    # A row left by a process that died before a reboot: its pid now belongs to another (live) process.
    stale = registry.start_run(db, corpus["id"], version["id"], {}, pid=me, pid_started=process_started(me) - 3600)
    assert not run_alive(registry.get_run(db, stale))
    assert recover_interrupted(db) == [stale]
    assert registry.get_run(db, stale)["status"] == "interrupted"
    # ... so it no longer blocks a new run.
    assert registry.start_run(db, corpus["id"], version["id"], {}, pid=me, pid_started=process_started(me)) > stale


def test_an_interrupted_incremental_run_resumes_its_own_plan(tmp_path, cartridge_home):
    """Killed during synthesis, then again before its first checkpoint: each resume continues the plan the
    run recorded before any work (same reused conversations, same files studied anew, same warm start)."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from conftest import ASSETS, ROOT, run_cli
    from engine.selfstudy.conversations import read_conversations
    from engine.training.pipeline import synth_dir

    root = tmp_path / "notes"
    shutil.copytree(ASSETS / "sample", root)
    flags = ["--tokens", "16", "--conversations", "16", "--steps", "4", "--chunk-tokens", "96", "--batch-size", "2",
             "--answer-tokens", "24", "--init", "spread"]
    assert run_cli("ingest", str(root), "--name", "notes", env_home=cartridge_home).returncode == 0
    assert run_cli("train", "notes", *flags, env_home=cartridge_home).returncode == 0
    changed = sorted(p.name for p in root.iterdir() if p.suffix == ".md")[0]
    (root / changed).write_text((root / changed).read_text() + "\nThe spare keys hang behind the red door.\n")
    assert run_cli("ingest", str(root), "--name", "notes", env_home=cartridge_home).returncode == 0
    db = registry.open_registry()
    corpus = registry.get_corpus(db, "notes")
    v1 = read_conversations(synth_dir(corpus, 1))
    env = {**os.environ, "CARTRIDGE_HOME": str(cartridge_home), "PYTHONPATH": str(ROOT)}

    def killed_when(ready, args):
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "train", "notes", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not ready():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the run never got there"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        pipeline.recover_interrupted(db)
        return registry.list_runs(db, corpus["id"])[-1]

    def synthesizing():
        runs = registry.list_runs(db, corpus["id"])
        return len(runs) == 2 and registry.run_metrics(db, runs[-1]["id"], "synthesis")

    run = killed_when(synthesizing, flags)
    assert run["status"] == "interrupted"
    plan = json.loads(run["config"])["plan"]
    assert plan["kind"] == "incremental" and plan["from_version"] == 1 and plan["changed_files"] == [changed]
    assert 0 < plan["reused"] < 16 and plan["new"] >= 2

    # Resumed, and killed again once training steps run (the first checkpoint comes at step 25).
    def training():
        return registry.run_metrics(db, run["id"], "training")
    again = killed_when(training, ["--resume"])
    assert again["id"] == run["id"] and json.loads(again["config"])["plan"] == plan

    proc = run_cli("train", "notes", "--resume", "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    final = registry.get_run(db, doc["run_id"])
    assert final["id"] == run["id"] and final["status"] == "done" and json.loads(final["config"])["plan"] == plan
    v2 = read_conversations(synth_dir(corpus, 2))
    assert len(v2) == plan["reused"] + plan["new"]
    unchanged = [c for c in v1 if changed not in c.files]
    assert [c.user for c in v2[:plan["reused"]]] == [c.user for c in unchanged]  # the same reuse
    assert all(changed in c.files for c in v2[plan["reused"]:])  # the changed file studied anew
    assert registry.get_corpus(db, "notes")["current_version"] == 2


def test_a_resumed_synthesis_makes_what_an_uninterrupted_one_makes(tmp_path):
    """Each conversation's chunk and random streams depend on its slot alone, so a synthesis stopped with
    unsaved conversations (as a kill leaves it) and resumed makes the same conversations, in the same order."""
    from conftest import ASSETS
    from engine.selfstudy.conversations import read_conversations, shard_paths
    from engine.corpus.chunks import ChunkSampler, Document
    from engine.engines.models import load_model
    from engine.training.pipeline import make_config, synthesize_version

    docs = [Document(p.name, p.name, p.read_text()) for p in sorted((ASSETS / "sample").glob("*.md"))]
    lm, sampler = load_model(None, None), ChunkSampler(docs)
    cfg = make_config("quick", conversations=12, chunk_tokens=96, max_user_tokens=32, max_answer_tokens=32)
    assert synthesize_version(lm, sampler, tmp_path / "whole", cfg) == 12

    made = {"n": 0}

    def count(progress):
        made["n"] = progress.done

    resumed = tmp_path / "resumed"
    synthesize_version(lm, sampler, resumed, cfg, on_progress=count, should_stop=lambda: made["n"] >= 9)
    shard_paths(resumed)[-1].unlink()  # the ninth was never saved
    assert len(read_conversations(resumed)) == 8
    assert synthesize_version(lm, sampler, resumed, cfg) == 12
    whole, again = read_conversations(tmp_path / "whole"), read_conversations(resumed)
    assert [c.slot for c in again] == [c.slot for c in whole]
    assert [(c.user, c.answer_ids.tolist()) for c in again] == [(c.user, c.answer_ids.tolist()) for c in whole]


def test_several_conversations_per_chunk_come_in_a_row_about_the_same_chunk(tmp_path):
    """With `chunk_questions`, each sampled chunk gets that many conversations one after another (their own
    slots and random streams; llama.cpp keeps the chunk's prompt for the next one), and the chunks cover
    the files as one conversation per chunk would."""
    from conftest import ASSETS
    from engine.selfstudy.conversations import read_conversations
    from engine.corpus.chunks import ChunkSampler, Document
    from engine.engines.models import load_model
    from engine.training.pipeline import make_config, synthesize_version

    docs = [Document(p.name, p.name, p.read_text()) for p in sorted((ASSETS / "sample").glob("*.md"))]
    lm, sampler = load_model(None, None), ChunkSampler(docs)
    cfg = make_config("quick", conversations=6, chunk_tokens=96, max_user_tokens=32, max_answer_tokens=24,
                      chunk_questions=2)
    assert synthesize_version(lm, sampler, tmp_path / "pairs", cfg) == 6
    convs = read_conversations(tmp_path / "pairs")
    first_round = [c for c in convs if c.slot[0] == 0]  # a rejected user turn is made up in a later round
    slots = [c.slot[1] for c in first_round]
    assert slots == sorted(set(slots)) and len(first_round) >= 4
    files = [chunk.files for chunk in sampler.sample_many(3, 96, seed=cfg.seed, cover=True)]
    assert len({f[0] for f in files}) == 3  # three chunks, one per file, as cover draws them
    assert all(c.files == files[c.slot[1] // 2] for c in first_round)  # slots 2j and 2j+1: chunk j
    pairs = [(a, b) for a, b in zip(first_round, first_round[1:]) if a.slot[1] // 2 == b.slot[1] // 2]
    assert pairs and all(a.user != b.user for a, b in pairs)  # each its own question


def test_a_file_that_left_the_folder_is_retrained_without_the_old_cartridge(tmp_path, cartridge_home):
    """The incremental warm start is the previous cartridge, which learned every file of its version: once a
    file is deleted (or excluded) the retrain is full. With nothing else changed it still trains (quoting
    conversations included), instead of failing for want of a changed file to study."""
    import shutil

    from conftest import ASSETS, TINY_TRAIN, run_cli

    root = tmp_path / "notes"
    shutil.copytree(ASSETS / "sample", root)
    assert run_cli("ingest", str(root), "--name", "notes", env_home=cartridge_home).returncode == 0
    assert run_cli("train", "notes", *TINY_TRAIN, env_home=cartridge_home).returncode == 0
    gone = sorted(p for p in root.iterdir() if p.suffix == ".md")[0]
    gone.unlink()
    assert run_cli("ingest", str(root), "--name", "notes", env_home=cartridge_home).returncode == 0
    proc = run_cli("train", "notes", *TINY_TRAIN, "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    db = registry.open_registry()
    run = registry.get_run(db, json.loads(proc.stdout)["run_id"])
    assert json.loads(run["config"])["plan"]["kind"] == "full"
    assert run["status"] == "done"


def test_a_diverged_retrain_is_not_saved_and_the_serving_cartridge_stays(tmp_path, cartridge_home):
    from conftest import ASSETS, TINY_TRAIN, run_cli, write

    root = tmp_path / "notes"
    write(root, "handbook.md", (ASSETS / "sample" / "handbook.md").read_text())
    assert run_cli("ingest", str(root), "--name", "notes", env_home=cartridge_home).returncode == 0
    assert run_cli("train", "notes", *TINY_TRAIN, env_home=cartridge_home).returncode == 0
    db = registry.open_registry()
    before = registry.get_version(db, registry.get_corpus(db, "notes"), 1)
    # the weights leave float16's range, which llama.cpp's KV cache holds, whether or not the loss overflows
    proc = run_cli("train", "notes", *TINY_TRAIN, "--lr", "1e36", env_home=cartridge_home)
    assert proc.returncode != 0 and "training diverged" in proc.stderr and "Traceback" not in proc.stderr
    after = registry.get_version(db, registry.get_corpus(db, "notes"), 1)
    assert after["status"] == "ready" and after["cartridge"] == before["cartridge"]
    assert (Path(after["cartridge"]) / "adapter_model.safetensors").exists()


def test_a_run_stopped_before_its_plan_was_recorded_resumes_with_the_plan_it_would_have_made(tmp_path, db):
    """Tokenizing a big folder comes before the plan is recorded; a run stopped there had done no work, so
    its resume plans afresh (the study scaled to the folder), instead of the preset's floor of conversations."""
    import shutil
    from dataclasses import asdict

    from conftest import ASSETS
    from engine.corpus.ingest import ingest

    root = tmp_path / "notes"
    shutil.copytree(ASSETS / "sample", root)
    ingest(root, db=db)
    corpus = registry.get_corpus(db, "notes")
    version = registry.latest_version(db, corpus["id"])
    cfg = pipeline.make_config("quick", p=16, conversations=4, conversations_per_ktok=2, max_conversations=6, steps=2,
                               chunk_tokens=96, batch_size=2, max_answer_tokens=24, max_user_tokens=32, init="spread",
                               verbatim=0.0)
    assert cfg.conversations_for(version["tokens"]) == 6
    run_id = registry.start_run(db, corpus["id"], version["id"], {"train": asdict(cfg), "preset": "quick"}, pid=os.getpid(),
                                pid_started=process_started(os.getpid()))
    registry.finish_run(db, run_id, "interrupted")
    outcome = pipeline.train(db, "notes", resume=True)
    assert outcome.run_id == run_id
    plan = json.loads(registry.get_run(db, run_id)["config"])["plan"]
    assert plan["kind"] == "full" and plan["conversations"] == 6
