"""One training job: corpus version -> self-study conversations -> distilled cartridge -> ready version.

Every stage leaves something resumable behind: conversations are written in shards as they are made,
training checkpoints every few steps, and the cartridge folder appears atomically at the end. A run that
dies is found by `recover_interrupted` (its process is gone) and marked interrupted; `resume=True`
picks it up where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from engine import registry
from engine.conversations import count_conversations, read_conversations, write_shard
from engine.corpus import ChunkSampler, version_documents
from engine.errors import UserError
from engine.paths import cartridges_dir, data_home
from engine.training import PRESETS, StepMetrics, TrainConfig

SHARD_SIZE = 8  # conversations per shard: a kill loses at most this many
MAX_SYNTHESIS_ROUNDS = 3


@dataclass
class Progress:
    """What a job reports while it runs: phase is load | synthesis | training | save | done."""

    phase: str
    done: int = 0
    total: int = 0
    eta_s: float | None = None
    rate: float | None = None  # conversations/s in synthesis, tokens/s in training
    loss: float | None = None
    message: str = ""


@dataclass
class TrainOutcome:
    corpus: str
    version: int
    cartridge: str
    tokens: int
    conversations: int
    steps: int
    loss_first: float
    loss_last: float
    seconds: float
    run_id: int

    def to_json(self) -> dict:
        return {"corpus": self.corpus, "version": self.version, "cartridge": self.cartridge, "tokens": self.tokens,
                "conversations": self.conversations, "steps": self.steps, "loss_first": round(self.loss_first, 5),
                "loss_last": round(self.loss_last, 5), "seconds": round(self.seconds, 1), "run_id": self.run_id}


def make_config(preset: str = "quick", **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    cfg = PRESETS[preset].replace(**overrides)
    if cfg.p < 2:
        raise UserError("--tokens must be at least 2")
    if cfg.conversations < 1 or (cfg.steps is not None and cfg.steps < 1):
        raise UserError("--conversations and --steps must be positive")
    return cfg


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(db) -> list[int]:
    """Mark runs whose process is gone as interrupted (and their versions, unless ready). Returns their ids."""
    found = []
    for run in registry.list_runs(db, status="running"):
        if run["pid"] == os.getpid() or _pid_alive(run["pid"]):
            continue
        registry.finish_run(db, run["id"], "interrupted", error="the training process stopped unexpectedly")
        version = db["versions"].get(run["version_id"])
        if version["status"] == "training":
            registry.update_version(db, version["id"], status="interrupted", error="training was interrupted")
        registry.add_event(db, run["corpus_id"], "interrupted", f"run {run['id']} was interrupted; resume to continue")
        found.append(run["id"])
    return found


def synth_dir(corpus_id: int, version_number: int) -> Path:
    return data_home() / "synth" / f"c{corpus_id}" / f"v{version_number}"


def run_dir(run_id: int) -> Path:
    return data_home() / "runs" / str(run_id)


def _synth_settings(cfg: TrainConfig, fingerprint: str) -> dict:
    return {"fingerprint": fingerprint, "chunk_tokens": cfg.chunk_tokens, "max_user_tokens": cfg.max_user_tokens,
            "max_answer_tokens": cfg.max_answer_tokens, "seed": cfg.seed}


def _prepare_synth_dir(folder: Path, settings: dict) -> None:
    """Keep conversations made earlier for this version with the same settings; otherwise start clean."""
    marker = folder / "settings.json"
    try:
        same = json.loads(marker.read_text()) == settings
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(settings))


def synthesize_version(lm, sampler: ChunkSampler, folder: Path, cfg: TrainConfig, *, backend: str = "auto",
                       only_files: set[str] | None = None, target: int | None = None,
                       on_progress: Callable[[Progress], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> int:
    """Make self-study conversations until `folder` holds `target`; returns how many it holds."""
    from engine.synthesis import load_seed_prompts, synthesize

    target = cfg.conversations if target is None else target
    seeds = load_seed_prompts(Path(__file__).resolve().parent.parent / "assets" / "seeds")
    began, made = time.perf_counter(), 0
    # Self-study drops user turns that fail its filters, so a round can come back short: draw fresh
    # chunks for what is missing, a few rounds at most.
    for attempt in range(MAX_SYNTHESIS_ROUNDS):
        have = count_conversations(folder)
        if have >= target or (should_stop and should_stop()):
            break
        chunks = sampler.sample_many(target - have, cfg.chunk_tokens, seed=cfg.seed + have + 7919 * attempt,
                                     only_files=only_files)
        pending = []
        for conversation in synthesize(lm, chunks, target - have, seeds=seeds, max_user_tokens=cfg.max_user_tokens,
                                       max_answer_tokens=cfg.max_answer_tokens, seed=cfg.seed + have + attempt,
                                       backend=backend):
            pending.append(conversation)
            made += 1
            if len(pending) >= SHARD_SIZE:
                write_shard(folder, pending)
                pending = []
            if on_progress:
                rate = made / (time.perf_counter() - began)
                done = have + made
                on_progress(Progress("synthesis", min(done, target), target, max(0, target - done) / rate if rate else None, rate))
            if should_stop and should_stop():
                break
        if pending:
            write_shard(folder, pending)
        made = 0
        began = time.perf_counter()
    return count_conversations(folder)


@dataclass
class Increment:
    """How a version is trained from the previous ready one: reused conversations, files to study anew."""

    from_version: int
    embeddings: object  # the previous cartridge's [p, hidden] tensor, the warm start
    reused: list
    changed_files: set[str]
    n_new: int


def plan_increment(db, corpus: dict, row: dict, lm, cfg: TrainConfig, documents) -> Increment | None:
    """Reuse what still holds from the newest earlier ready version, or None for a full train.

    Conversations whose chunks come only from unchanged files are kept; new and changed files get new
    conversations in proportion to their share of the corpus; deleted files' conversations are dropped.
    """
    from engine.cartridge import load_cartridge
    from engine.errors import CartridgeMismatch

    earlier = [v for v in registry.list_versions(db, corpus["id"])
               if v["number"] < row["number"] and v["status"] == "ready" and v["cartridge"]]
    if not earlier:
        return None
    prev = earlier[-1]
    try:
        cartridge = load_cartridge(Path(prev["cartridge"]), lm)
    except CartridgeMismatch:
        return None
    if cartridge.p != cfg.p:
        return None
    current = {d.path: d.sha256 for d in documents}
    before = {f["path"]: f["sha256"] for f in registry.version_files(db, prev["id"])}
    changed = {path for path, sha in current.items() if before.get(path) != sha}
    old = read_conversations(synth_dir(corpus["id"], prev["number"]))
    reused = [c for c in old if all(current.get(f) == h for f, h in zip(c.files, c.file_hashes))]
    tokens = {f["path"]: f["tokens"] for f in registry.version_files(db, row["id"])}
    share = sum(tokens.get(p, 0) for p in changed) / max(1, sum(tokens.values()))
    n_new = 0 if not changed else max(cfg.batch_size, math.ceil(cfg.conversations * share))
    return Increment(prev["number"], cartridge.embeddings, reused, changed, n_new)


def _replay(kept: list, n_fresh: int, cfg: TrainConfig) -> list:
    """A seeded sample of reused conversations trained beside the new ones (as many), so old knowledge is refreshed."""
    count = max(n_fresh, cfg.batch_size * 2) if n_fresh else max(cfg.batch_size * 2, len(kept) // 10)
    return random.Random(cfg.seed).sample(kept, min(len(kept), count))


def _write_in_shards(folder: Path, conversations: list) -> None:
    for i in range(0, len(conversations), SHARD_SIZE):
        write_shard(folder, conversations[i:i + SHARD_SIZE])


def train(db, corpus_name: str, *, version: int | None = None, preset: str = "quick", model: str | None = None,
          device: str | None = None, resume: bool = False, incremental: bool = True, synthesis_backend: str = "auto",
          on_progress: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
          **overrides) -> TrainOutcome:
    """Train (or resume) the cartridge of a corpus version and make that version current."""
    from engine.cartridge import (cartridge_embeddings, corpus_init_text, create_cartridge_model, peft_config_for,
                                  save_cartridge)
    from engine.models import load_model
    from engine.training import distill

    recover_interrupted(db)
    corpus = registry.get_corpus(db, corpus_name)
    row = registry.get_version(db, corpus, version) if version is not None else registry.latest_version(db, corpus["id"])
    if row is None:
        raise UserError(f"corpus {corpus_name!r} has no version yet; run `cartridge ingest`")
    running = [r for r in registry.list_runs(db, corpus["id"], status="running")]
    if running:
        raise UserError(f"{corpus_name!r} is already training (run {running[0]['id']})")

    previous = None
    if resume:
        candidates = [r for r in registry.list_runs(db, corpus["id"]) if r["version_id"] == row["id"]
                      and r["status"] in ("interrupted", "cancelled")]
        if not candidates:
            raise UserError(f"nothing to resume for {corpus_name!r} v{row['number']}; train without --resume")
        previous = candidates[-1]
        saved = json.loads(previous["config"])
        cfg = TrainConfig(**saved["train"])
        resumed_increment = saved.get("incremental")
        model, preset = saved.get("model"), saved.get("preset", preset)
    else:
        cfg = make_config(preset, **overrides)
        resumed_increment = None

    report = on_progress or (lambda progress: None)
    report(Progress("load", message=f"loading model {model or 'default'}"))
    lm = load_model(model, device)
    config_doc = {"train": asdict(cfg), "preset": preset, "model": model, "device": str(lm.device)}
    if previous:
        run_id = previous["id"]
        db["runs"].update(run_id, {"status": "running", "pid": os.getpid(), "finished": None, "error": None})
    else:
        run_id = registry.create_run(db, corpus["id"], row["id"], config_doc, pid=os.getpid())
    was_ready = row["status"] == "ready"  # retraining a ready version: its cartridge keeps serving meanwhile
    if not was_ready:
        registry.update_version(db, row["id"], status="training", error=None)
    registry.add_event(db, corpus["id"], "train_started", f"training v{row['number']} (run {run_id})",
                       {"preset": preset, "p": cfg.p})
    began = time.perf_counter()
    try:
        documents = version_documents(db, row)
        sampler = ChunkSampler(documents, None if lm.spec == "default" else lm.spec)
        folder = synth_dir(corpus["id"], row["number"])
        _prepare_synth_dir(folder, _synth_settings(cfg, lm.fingerprint))
        increment = plan_increment(db, corpus, row, lm, cfg, documents) if incremental and not resume else None

        def on_synth(progress: Progress) -> None:
            report(progress)
            registry.add_metric(db, run_id, "synthesis", progress.done, data={"rate": progress.rate})

        if resumed_increment is not None:
            # Same data as the interrupted incremental run: its fresh conversations plus the same replay.
            every = read_conversations(folder)
            kept = resumed_increment["reused"]
            conversations = every[kept:] + _replay(every[:kept], resumed_increment["new"], cfg)
            init_text = corpus_init_text(sampler, cfg.p)
            config_doc["incremental"] = resumed_increment
        elif increment is None:
            synthesize_version(lm, sampler, folder, cfg, backend=synthesis_backend, on_progress=on_synth,
                               should_stop=should_stop)
            conversations = read_conversations(folder)[: cfg.conversations]
            init_text = corpus_init_text(sampler, cfg.p)
        else:
            if count_conversations(folder) == 0:
                _write_in_shards(folder, increment.reused)
            kept = len(increment.reused)
            if increment.n_new:
                synthesize_version(lm, sampler, folder, cfg, backend=synthesis_backend, only_files=increment.changed_files,
                                   target=kept + increment.n_new, on_progress=on_synth, should_stop=should_stop)
            every = read_conversations(folder)
            fresh = every[kept:]
            conversations = fresh + _replay(every[:kept], len(fresh), cfg)
            cfg = cfg.replace(steps=cfg.steps or max(1, math.ceil(len(conversations) / cfg.batch_size)))
            config_doc["train"] = asdict(cfg)
            config_doc["incremental"] = {"from_version": increment.from_version, "reused": kept,
                                         "new": len(fresh), "changed_files": sorted(increment.changed_files)}
            registry.update_run_config(db, run_id, config_doc)
        if should_stop and should_stop():
            return _stopped(db, corpus, row, run_id)
        if not conversations:
            raise UserError("self-study produced no usable conversations")
        if increment is None:
            # Initialise from the first p tokens of the corpus (wrapped as a system message).
            peft_model = create_cartridge_model(lm, cfg.p, init_text)
        else:
            peft_model = create_cartridge_model(lm, cfg.p, embeddings=increment.embeddings)

        def on_step(m: StepMetrics) -> None:
            report(Progress("training", m.step, m.total_steps, m.eta_s, m.tokens_per_s, m.loss))
            registry.add_metric(db, run_id, "training", m.step, loss=m.loss, tokens_per_s=m.tokens_per_s,
                                elapsed_s=m.elapsed_s)

        result = distill(peft_model, lm, conversations, cfg, on_step=on_step, checkpoint_dir=run_dir(run_id) / "checkpoint",
                         resume=resume, should_stop=should_stop)
        if result.stopped:
            _unwrap(peft_model)
            return _stopped(db, corpus, row, run_id)
        report(Progress("save", message="writing the cartridge"))
        seconds = time.perf_counter() - began
        metrics = {"incremental": config_doc.get("incremental"), "loss_first": result.loss_first, "loss_last": result.loss_last, "steps": result.steps,
                   "conversations": len(conversations), "seconds": round(seconds, 1),
                   "tokens_per_s": round(result.tokens_per_s, 1)}
        target = cartridges_dir() / f"c{corpus['id']}" / f"v{row['number']}"
        save_cartridge(cartridge_embeddings(peft_model), peft_config_for(cfg.p), target, {
            "base_model": lm.spec, "fingerprint": lm.fingerprint, "p": cfg.p, "n_layers": lm.n_layers,
            "n_kv_heads": lm.n_kv_heads, "head_dim": lm.head_dim, "corpus": corpus["name"],
            "corpus_root": corpus["root"], "version": row["number"], "manifest_hash": row["manifest_hash"],
            "training": config_doc, "metrics": metrics, "created": time.time()})
        _unwrap(peft_model)
        with registry.transaction(db):
            registry.update_version(db, row["id"], status="ready", cartridge=str(target), error=None)
            registry.update_corpus(db, corpus["id"], current_version=row["number"])
            registry.finish_run(db, run_id, "done", cartridge=str(target), summary=metrics)
            registry.add_event(db, corpus["id"], "train_finished", f"v{row['number']} is ready", metrics)
        shutil.rmtree(run_dir(run_id), ignore_errors=True)
        report(Progress("done", 1, 1, message="ready"))
        return TrainOutcome(corpus["name"], row["number"], str(target), cfg.p, len(conversations), result.steps,
                            result.loss_first, result.loss_last, seconds, run_id)
    except KeyboardInterrupt:
        _stopped(db, corpus, row, run_id, status="interrupted")
        raise
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, MemoryError) or "out of memory" in message.lower():
            message = f"out of memory ({message}): try a smaller --tokens or batch size"
        registry.finish_run(db, run_id, "failed", error=message)
        if not was_ready:
            registry.update_version(db, row["id"], status="failed", error=message)
        registry.add_event(db, corpus["id"], "train_failed", f"training v{row['number']} failed: {message}")
        if isinstance(exc, UserError):
            raise
        raise UserError(f"training failed: {message}") from exc


def _unwrap(peft_model) -> None:
    """Remove the adapter hooks so the cached base model serves the next job unchanged."""
    try:
        peft_model.unload()
    except Exception:
        pass


def _stopped(db, corpus: dict, row: dict, run_id: int, status: str = "cancelled"):
    registry.finish_run(db, run_id, status, error="stopped before the end; resume to continue")
    if db["versions"].get(row["id"])["status"] != "ready":
        registry.update_version(db, row["id"], status="interrupted", error="training was stopped")
    registry.add_event(db, corpus["id"], status, f"training v{row['number']} stopped (run {run_id})")
    return None
