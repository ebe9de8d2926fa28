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
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from engine.cartridge import kv_select
from engine.cartridge.metadata import trained_setting
from engine.store import registry
from engine.selfstudy.verbatim import verbatim_conversations, verbatim_count
from engine.selfstudy.conversations import conversation_slots, count_conversations, read_conversations, write_shard
from engine.corpus.chunks import ChunkSampler, version_documents
from engine.engines.models import cpu_has_fast_bf16
from engine.errors import UserError
from engine.store.paths import cartridges_dir, data_home
from engine.training.distill import (INITS, LR_SCHEDULES, PRESETS, QUOTES, TEACHERS, StepMetrics, TrainConfig,
                             split_heldout)

SHARD_SIZE = 8  # conversations per shard: a kill loses at most this many
MAX_SYNTHESIS_ROUNDS = 3
SEEDS_DIR = Path(__file__).resolve().parents[2] / "assets" / "seeds"
TEMPLATE_MARGIN = 320  # teacher prompt tokens beyond the corpus text: template, seed prompt, file headers
WORSE_MARGIN = 0.05  # a watcher retrain whose held-out score is lower by more than this stays not current


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
    heldout: dict | None = None  # the held-out score and its parts (see training.BestState.to_json)
    current: bool = True  # False when a newer version serves, or a watcher retrain scored clearly worse
    not_current: str | None = None  # why it was not made current
    engines: dict | None = None  # what made the conversations and what trained (see `train`)

    def to_json(self) -> dict:
        return {"corpus": self.corpus, "version": self.version, "cartridge": self.cartridge, "tokens": self.tokens,
                "conversations": self.conversations, "steps": self.steps, "loss_first": round(self.loss_first, 5),
                "loss_last": round(self.loss_last, 5), "seconds": round(self.seconds, 1), "run_id": self.run_id,
                "heldout": self.heldout["score"] if self.heldout else None, "heldout_detail": self.heldout,
                "current": self.current, "not_current": self.not_current, "engines": self.engines}


def make_config(preset: str = "quick", **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if overrides.get("conversations") is not None and overrides.get("conversations_per_ktok") is None:
        overrides = {**overrides, "conversations_per_ktok": 0.0}  # an explicit count is used as it is
    if overrides.get("p") is not None and overrides.get("max_p") is None:
        overrides = {**overrides, "max_p": 0}  # so is an explicit p
    cfg = PRESETS[preset].replace(**overrides)
    if cfg.p < 2:
        raise UserError("--tokens must be at least 2")
    if cfg.conversations < 1 or (cfg.steps is not None and cfg.steps < 1):
        raise UserError("--conversations and --steps must be positive")
    if cfg.batch_size < 1 or cfg.chunk_tokens < 1:
        raise UserError("--batch-size and --chunk-tokens must be at least 1")
    if not cfg.lr > 0:
        raise UserError("the learning rate must be positive")
    if cfg.max_answer_tokens < 1:
        raise UserError("--answer-tokens must be positive")
    if cfg.chunk_questions < 1:
        raise UserError("chunk_questions must be at least 1 (self-study conversations per sampled chunk)")
    if cfg.verbatim < 0:
        raise UserError("verbatim must be 0 or more (quoting conversations per self-study one)")
    if not 0 <= cfg.cloze <= 1 or not 0 <= cfg.topics <= 1 or not 0 <= cfg.rag <= 1 or cfg.cloze + cfg.topics > 1:
        raise UserError("cloze, topics and rag are shares: between 0 and 1 (cloze + topics at most 1)")
    for name, value, allowed in (("teacher", cfg.teacher, TEACHERS), ("init", cfg.init, INITS),
                                 ("lr_schedule", cfg.lr_schedule, LR_SCHEDULES), ("quotes", cfg.quotes, QUOTES)):
        if value not in allowed:
            raise UserError(f"unknown {name} {value!r} (choose from {', '.join(allowed)})")
    if cfg.seed_mix:
        from engine.selfstudy.prompts import load_seed_prompts, mix_seeds

        mix_seeds(load_seed_prompts(SEEDS_DIR), cfg.seed_mix)  # a bad mix is refused before any work
    return cfg


PID_START_TOLERANCE_S = 30.0


def process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return 0.0  # exists, but we may not look at it: count it as alive


def run_alive(run: dict) -> bool:
    """Is the process that runs `run` still the one that started it? A pid alone is not enough: after a
    reboot another process may have the same pid, so its start time must match too."""
    if not run["pid"]:
        return False
    started = process_started(run["pid"])
    if started is None:
        return False
    recorded = run.get("pid_started")
    # Within 30 s: a start time is derived from the wall clock's idea of the boot time, which moves when the
    # clock is set (NTP, waking from sleep); a reused pid belongs to a process started after the run's died.
    return recorded is None or started == 0.0 or abs(started - recorded) < PID_START_TOLERANCE_S


def recover_interrupted(db) -> list[int]:
    """Mark runs whose process is gone as interrupted (and their versions, unless ready). Returns their ids."""
    found = []
    for run in registry.list_runs(db, status="running"):
        if run_alive(run):
            continue
        registry.finish_run(db, run["id"], "interrupted", error="the training process stopped unexpectedly")
        version = db["versions"].get(run["version_id"])
        if version["status"] == "training":
            registry.update_version(db, version["id"], status="interrupted", error="training was interrupted")
        registry.add_event(db, run["corpus_id"], "interrupted", f"run {run['id']} was interrupted; resume to continue")
        found.append(run["id"])
    return found


def _corpus_bases() -> list[Path]:
    """Where the app writes for its corpora: conversations, run checkpoints, cartridges."""
    return [data_home() / "synth", data_home() / "runs", cartridges_dir()]


def corpus_folders(corpus: dict) -> list[Path]:
    """Every folder the app writes for a corpus (conversations, run checkpoints, cartridges), named by
    its uid, which is never reused: a later corpus can never find an earlier one's files."""
    return [base / corpus["uid"] for base in _corpus_bases()]


def _left_behind(db) -> list[Path]:
    """Folders named by the uid of a corpus the registry no longer has: what a removal stopped between its
    registry transaction and its deletions left on disk."""
    known = {c["uid"] for c in registry.list_corpora(db)}
    found = []
    for base in _corpus_bases():
        if base.is_dir():
            found += [d for d in base.iterdir() if d.is_dir() and re.fullmatch(r"[0-9a-f]{32}", d.name)
                      and d.name not in known]
    return found


def remove_corpus(db, name: str) -> dict:
    """Forget a corpus and delete every file the app made for it (conversations, checkpoints, cartridges),
    once the registry transaction has committed; also what an earlier removal, stopped half-way, left.
    Refused while it trains. Returns the removed corpus."""
    recover_interrupted(db)
    corpus = registry.get_corpus(db, name)
    running = registry.list_runs(db, corpus["id"], status="running")
    if running:
        raise UserError(f"{name!r} is training (run {running[0]['id']}); stop it before removing the corpus")
    registry.delete_corpus(db, corpus["id"])
    for folder in corpus_folders(corpus) + _left_behind(db):
        shutil.rmtree(folder, ignore_errors=True)
    scrubbed = registry.scrub_deleted_text(db)
    return {"name": corpus["name"], "root": corpus["root"], "removed": True, "scrubbed": scrubbed}


def synth_dir(corpus: dict, version_number: int) -> Path:
    return data_home() / "synth" / corpus["uid"] / f"v{version_number}"


def run_dir(corpus: dict, run_id: int) -> Path:
    return data_home() / "runs" / corpus["uid"] / str(run_id)


def _synth_settings(cfg: TrainConfig, fingerprint: str, corpus: dict, row: dict) -> dict:
    """What the conversations of a version depend on: kept conversations must match all of it."""
    settings = {"fingerprint": fingerprint, "chunk_tokens": cfg.chunk_tokens, "max_user_tokens": cfg.max_user_tokens,
                "max_answer_tokens": cfg.max_answer_tokens, "seed": cfg.seed, "teacher": cfg.teacher,
                "teacher_tokens": cfg.teacher_tokens, "corpus_uid": corpus["uid"], "manifest_hash": row["manifest_hash"]}
    if cfg.seed_mix:  # absent when uniform, so conversations saved before the setting existed still match
        settings["seed_mix"] = cfg.seed_mix
    if cfg.chunk_questions > 1:  # likewise absent at one conversation per chunk
        settings["chunk_questions"] = cfg.chunk_questions
    return settings


def teacher_budget(cfg: TrainConfig, max_positions: int) -> int:
    """Corpus tokens the teacher can see next to one conversation in the model's context."""
    room = max_positions - cfg.max_user_tokens - cfg.max_answer_tokens - TEMPLATE_MARGIN
    return max(cfg.chunk_tokens, min(room, cfg.teacher_tokens) if cfg.teacher_tokens else room)


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
                       should_stop: Callable[[], bool] | None = None, server=None, concurrency: int = 4) -> int:
    """Make self-study conversations until `folder` holds `target`; returns how many it holds.

    With `server` (an `engine.engines.server.ServerClient`) the conversations are made on that inference
    server, `concurrency` at a time, instead of by `backend` in this process."""
    from engine.selfstudy.prompts import load_seed_prompts, mix_seeds
    from engine.selfstudy.synthesis import synthesize

    target = cfg.conversations if target is None else target
    seeds = mix_seeds(load_seed_prompts(SEEDS_DIR), cfg.seed_mix)
    began, made = time.perf_counter(), 0
    # Self-study drops user turns that fail its filters, so a round can come back short: draw fresh
    # chunks for what is missing, a few rounds at most. A round's chunk list and each conversation's random
    # streams depend only on (seed, round, index): a resumed run continues after the last saved slot and
    # makes what an uninterrupted run would have made.
    for attempt in range(MAX_SYNTHESIS_ROUNDS):
        slots = conversation_slots(folder)
        have = len(slots)
        if have >= target or (should_stop and should_stop()):
            break
        if any(slot and slot[0] > attempt for slot in slots):
            continue  # this round was finished before an interruption
        carried = sum(slot is None for slot in slots)  # reused from an earlier version
        per_chunk = cfg.chunk_questions
        chunks = sampler.sample_many(-(-(target - carried) // per_chunk), cfg.chunk_tokens,
                                     seed=cfg.seed + 7919 * attempt, only_files=only_files, cover=True)
        if cfg.teacher == "corpus":
            chunks = sampler.with_teacher_context(chunks, teacher_budget(cfg, lm.max_positions))
        # Each chunk's conversations come one after another: llama.cpp keeps the prompt they share.
        chunks = [replace(chunk, slot=(attempt, index * per_chunk + j))
                  for index, chunk in enumerate(chunks) for j in range(per_chunk)]
        done = [slot for slot in slots if slot and slot[0] == attempt]
        if done:
            order = [chunk.slot for chunk in chunks]
            chunks = chunks[max(order.index(slot) for slot in done) + 1:]
        pending = []
        if server is not None:
            from engine.selfstudy.server_backend import synthesize_on_server

            made_here = synthesize_on_server(server, lm.tokenizer, chunks, target - have, seeds=seeds,
                                             max_user_tokens=cfg.max_user_tokens,
                                             max_answer_tokens=cfg.max_answer_tokens, seed=cfg.seed,
                                             concurrency=concurrency, should_stop=should_stop)
        else:
            made_here = synthesize(lm, chunks, target - have, seeds=seeds, max_user_tokens=cfg.max_user_tokens,
                                   max_answer_tokens=cfg.max_answer_tokens, seed=cfg.seed, backend=backend)
        try:
            for conversation in made_here:
                pending.append(conversation)
                made += 1
                if len(pending) >= SHARD_SIZE:
                    write_shard(folder, pending)
                    pending = []
                if on_progress:
                    rate = made / (time.perf_counter() - began)
                    done_now = have + made
                    on_progress(Progress("synthesis", min(done_now, target), target,
                                         max(0, target - done_now) / rate if rate else None, rate))
                if should_stop and should_stop():
                    break
        finally:  # also when the engine or server fails: what was made is kept for a resume
            if pending:
                write_shard(folder, pending)
        made = 0
        began = time.perf_counter()
    return count_conversations(folder)


@dataclass
class Plan:
    """What a run trains on, fixed before any work starts; resuming continues exactly this.

    full: the first `conversations` of the version's self-study. incremental: the `reused` conversations
    of `from_version` whose files are unchanged, then `new` ones about `changed_files`, warm-started from
    that version's cartridge.
    """

    kind: str  # "full" | "incremental"
    conversations: int  # how many the version's conversations folder holds when training starts
    from_version: int | None = None
    reused: int = 0
    new: int = 0
    changed_files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        return {"from_version": self.from_version, "reused": self.reused, "new": self.new,
                "changed_files": self.changed_files}

    @classmethod
    def from_config(cls, saved: dict) -> "Plan | None":
        """The plan an interrupted run recorded (runs from before plans were recorded: rebuilt from its summary),
        or None: the run stopped before it recorded one, so before any work."""
        if "plan" in saved:
            return cls(**saved["plan"])
        inc = saved.get("incremental")
        if inc:
            return cls("incremental", inc["reused"] + inc["new"], inc["from_version"], inc["reused"], inc["new"],
                       list(inc["changed_files"]))
        return None


# Measured with the quick preset on a 2-core CPU: llama.cpp self-study ~1.7 s per chunk prompt (shared by
# the chunk's `chunk_questions` conversations) and ~1.8 s for each conversation's own turns (3.3-3.7 s a
# conversation in all, on the sample and on a 28,744-token docs folder); distillation per conversation per
# step at p=576 (held-out scoring included) ~1.8 s with fp32 matmuls and ~0.75 s with bf16 ones (CPUs with
# AVX512-BF16 or AMX, see engine.engines.models; 0.74 s measured at p=1,024 scaled to 576); reading the sample's 5,000
# tokens whole for the attention initialisation ~170 s / ~75 s when it held whole attention matrices, times
# the 0.55 its chunked scores (engine.cartridge.kv_select) took of that on one machine: ~95 s / ~40 s, and
# ~22 s since that reading runs under bf16 autocast where the CPU has it (42 s in fp32 on that CPU). A corpus
# beyond the context is read in windows, and the reading grows about as its tokens do (bf16: orjson's README,
# 13,613 tokens in two windows, 43 s; termdocs, 28,744 in four, 110 s; this scaling says 60 s and 126 s, the
# square of each window's length said 82 s and 182 s).
# Used for the estimate shown before a run.
CPU_SYNTHESIS_S = {"chunk": 1.7, "conversation": 1.8}
CPU_SECONDS_PER_EXAMPLE = {"fp32": 1.8, "bf16": 0.75}
CPU_ATTENTION_INIT_S = {"fp32": 95.0, "bf16": 22.0}


def plan_message(plan: Plan, cfg: TrainConfig, corpus_tokens: int, device: str) -> str:
    """One line saying what the run will do and, on a CPU, about how long it takes."""
    to_make = plan.new if plan.kind == "incremental" else plan.conversations
    if plan.kind == "incremental":
        what = (f"incremental from v{plan.from_version}: {plan.reused} conversations reused, {plan.new} new about "
                f"{len(plan.changed_files)} changed file(s)")
        n_train = cfg.train_examples(plan.new + min(plan.reused, _replay_count(plan.reused, plan.new)))
        steps = cfg.steps or max(1, math.ceil(n_train / cfg.batch_size))
    else:
        scaled = "" if cfg.conversations_per_ktok <= 0 else (
            f" ({cfg.conversations_per_ktok:g} per 1k of {corpus_tokens:,} tokens, floor {cfg.conversations}, "
            f"cap {cfg.max_conversations})")
        what = f"{plan.conversations} self-study conversations{scaled}"
        steps = cfg.total_steps(cfg.train_examples(plan.conversations))
    line = f"plan: {what}, {steps} training steps of {cfg.batch_size}, a cartridge of p={cfg.p}"
    if device == "cpu":
        matmuls = "bf16" if cpu_has_fast_bf16() else "fp32"
        per_conversation = CPU_SYNTHESIS_S["conversation"] + CPU_SYNTHESIS_S["chunk"] / cfg.chunk_questions
        minutes = (to_make * per_conversation / 60
                   + steps * cfg.batch_size * CPU_SECONDS_PER_EXAMPLE[matmuls] * cfg.p / 576 / 60)
        if cfg.init == "attention" and plan.kind == "full":  # whole, or in windows beyond the context
            read = sum(hi - lo for lo, hi in kv_select.read_windows(corpus_tokens, 8192 - kv_select.WINDOW_MARGIN))
            minutes += CPU_ATTENTION_INIT_S[matmuls] * read / 5000 / 60
        line += f", about {minutes:.0f} min on a 2-core CPU"
    return line


def _earlier_ready(db, corpus: dict, row: dict) -> dict | None:
    earlier = [v for v in registry.list_versions(db, corpus["id"])
               if v["number"] < row["number"] and v["status"] == "ready" and v["cartridge"]]
    return earlier[-1] if earlier else None


def choose_p(db, corpus: dict, row: dict, cfg: TrainConfig, incremental: bool = True) -> int:
    """The run's p: the preset's p for this corpus's size; an incremental retrain keeps the p of the
    cartridge it would start from while that is within a quarter of it, so a folder that grows a little
    is not retrained from scratch for a slightly different p."""
    from engine.store.library import cartridge_info

    p = cfg.p_for(int(row["tokens"] or 0))
    prev = _earlier_ready(db, corpus, row) if incremental and cfg.max_p else None
    info = cartridge_info(prev["cartridge"]) if prev else None
    old = int((info or {}).get("p") or 0)
    return old if old and abs(old - p) <= p / 4 else p


def previous_cartridge(db, corpus: dict, number: int, lm):
    """The warm start of an incremental plan: that version's cartridge embeddings."""
    from engine.cartridge.format import load_cartridge

    return load_cartridge(Path(registry.get_version(db, corpus, number)["cartridge"]), lm).embeddings


def reused_conversations(db, corpus: dict, number: int, documents) -> list:
    """Conversations of version `number` whose files all still have the same content."""
    current = {d.path: d.sha256 for d in documents}
    old = read_conversations(synth_dir(corpus, number))
    kept = [c for c in old if all(current.get(f) == h for f, h in zip(c.files, c.file_hashes))]
    for conversation in kept:
        conversation.slot = None  # carried over: not one of this version's synthesis slots
    return kept


def make_plan(db, corpus: dict, row: dict, lm, cfg: TrainConfig, documents, incremental: bool = True) -> Plan:
    """Reuse what still holds from the newest earlier ready version (incremental), else a full plan.

    Conversations whose chunks come only from unchanged files are kept; new and changed files get new
    conversations in proportion to their share of the corpus. A file that left the folder (deleted, or
    now excluded) makes the plan full: the previous cartridge, the incremental warm start, learned it.
    """
    from engine.errors import CartridgeMismatch

    full = Plan("full", cfg.conversations_for(int(row["tokens"] or 0)))
    prev = _earlier_ready(db, corpus, row) if incremental else None
    if prev is None:
        return full
    try:
        if previous_cartridge(db, corpus, prev["number"], lm).shape[0] != cfg.p:
            return full
    except CartridgeMismatch:
        return full
    current = {d.path: d.sha256 for d in documents}
    before = {f["path"]: f["sha256"] for f in registry.version_files(db, prev["id"])}
    if set(before) - set(current):
        return full
    changed = sorted(path for path, sha in current.items() if before.get(path) != sha)
    reused = reused_conversations(db, corpus, prev["number"], documents)
    total = full.conversations
    if cfg.teacher == "corpus" and len(reused) < total // 2:
        return full  # a corpus-wide teacher saw the changed files in most answers: train afresh
    tokens = {f["path"]: f["tokens"] for f in registry.version_files(db, row["id"])}
    share = sum(tokens.get(p, 0) for p in changed) / max(1, sum(tokens.values()))
    n_new = 0 if not changed else new_conversations(total, share)
    return Plan("incremental", len(reused) + n_new, prev["number"], len(reused), n_new, changed)


# An incremental retrain writes at least this many new conversations about its changed files, and replays
# at least twice as many reused ones, whatever the batch size: a tiny edit still gets a few questions.
MIN_NEW_CONVERSATIONS = 4


def new_conversations(total: int, share: float) -> int:
    """New conversations for changed files holding `share` of the corpus's tokens, out of a full plan's `total`."""
    return max(MIN_NEW_CONVERSATIONS, math.ceil(total * share))


def _replay(kept: list, n_fresh: int, cfg: TrainConfig) -> list:
    """A seeded sample of reused conversations trained beside the new ones (as many), so old knowledge is refreshed."""
    return random.Random(cfg.seed).sample(kept, min(len(kept), _replay_count(len(kept), n_fresh)))


def _replay_count(n_kept: int, n_fresh: int) -> int:
    floor = 2 * MIN_NEW_CONVERSATIONS
    return max(n_fresh, floor) if n_fresh else max(floor, n_kept // 10)


def with_passages(db, row: dict, conversations: list, cfg: TrainConfig, tokenizer) -> list:
    """A seeded `cfg.rag` share of the conversations with the passages retrieved for their question (from
    the version `row` alone, p tokens as chat's cartridge+rag) as the student's system prompt."""
    from engine.corpus.retrieval import rag_prompt

    chosen = set(random.Random(f"rag-{cfg.seed}").sample(range(len(conversations)),
                                                        round(cfg.rag * len(conversations))))
    out = []
    for i, conv in enumerate(conversations):
        prompt, passages = rag_prompt(db, [row], conv.user, cfg.p, tokenizer) if i in chosen else ("", [])
        out.append(replace(conv, context=prompt) if passages else conv)
    return out


def _write_in_shards(folder: Path, conversations: list) -> None:
    for i in range(0, len(conversations), SHARD_SIZE):
        write_shard(folder, conversations[i:i + SHARD_SIZE])


def train(db, corpus_name: str, *, version: int | None = None, preset: str = "quick", model: str | None = None,
          device: str | None = None, resume: bool = False, incremental: bool = True, synthesis_backend: str = "auto",
          on_progress: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
          guard_current: bool = False, nproc: int = 1, synthesis_server: str | None = None,
          server_model: str | None = None, concurrency: int = 4, server_timeout: float | None = None,
          **overrides) -> TrainOutcome:
    """Train (or resume) the cartridge of a corpus version and make that version current.

    With `synthesis_server` (a URL) the self-study conversations are made on that inference server
    (llama.cpp's llama-server, vLLM or SGLang; see engine.engines.server), `concurrency` at a time; a
    server whose tokenizer is not the training model's is refused before any work.

    With `nproc` > 1 the distillation runs in that many processes (engine.training.distributed); the plan and the
    self-study stay in this one.

    With `guard_current` (retrains the watcher starts), a version whose held-out score is clearly worse
    than the serving cartridge's on the same held-out questions is kept, ready, but not made current; an
    event says why.
    """
    from engine.cartridge.format import (cartridge_embeddings, create_cartridge_model, init_embeddings, out_of_range,
                                  peft_config_for, save_cartridge)
    from engine.engines.models import load_model
    from engine.training.distill import distill

    recover_interrupted(db)
    corpus = registry.get_corpus(db, corpus_name)
    row = registry.get_version(db, corpus, version) if version is not None else registry.latest_version(db, corpus["id"])
    if row is None:
        raise UserError(f"corpus {corpus_name!r} has no version yet; run `cartridge ingest`")

    previous = None
    if resume:
        candidates = [r for r in registry.list_runs(db, corpus["id"]) if r["version_id"] == row["id"]
                      and r["status"] in ("interrupted", "cancelled")]
        if not candidates:
            raise UserError(f"nothing to resume for {corpus_name!r} v{row['number']}; train without --resume")
        previous = candidates[-1]
        saved = json.loads(previous["config"])
        cfg = TrainConfig(**saved["train"])
        model, preset = saved.get("model"), saved.get("preset", preset)
        if synthesis_server is None and saved.get("server"):  # resume on the server the run started with
            synthesis_server, server_model = saved["server"]["url"], saved["server"].get("model") or None
            concurrency = saved["server"].get("concurrency", concurrency)
    else:
        cfg = make_config(preset, **overrides)
        cfg = cfg.replace(p=choose_p(db, corpus, row, cfg, incremental))

    report = on_progress or (lambda progress: None)
    report(Progress("load", message=f"loading model {model or 'default'}"))
    lm = load_model(model, device)
    if nproc > 1:
        from engine.training.distributed import check

        check(nproc, cfg.batch_size, lm.device.type)
    server = None
    if synthesis_server:
        from engine.engines.server import ServerClient

        if concurrency < 1:
            raise UserError("--concurrency must be at least 1")
        if server_timeout is not None and server_timeout <= 0:
            raise UserError("--server-timeout must be more than 0 seconds")
        server = ServerClient(synthesis_server, model=server_model,
                              **({"timeout": server_timeout} if server_timeout else {}))
        try:
            server.check_tokenizer(lm.tokenizer)
        except BaseException:
            server.close()
            raise
    config_doc = {"train": asdict(cfg), "preset": preset, "model": model, "device": str(lm.device)}
    if server is not None:
        config_doc["server"] = {**server.describe(), "concurrency": concurrency}
    try:
        run_id = registry.start_run(db, corpus["id"], row["id"], config_doc, pid=os.getpid(),
                                    pid_started=process_started(os.getpid()),
                                    resume_run=previous["id"] if previous else None)
    except UserError:
        raise UserError(f"{corpus_name!r} is already training; wait for it or stop it first") from None
    was_ready = row["status"] == "ready"  # retraining a ready version: its cartridge keeps serving meanwhile
    if not was_ready:
        registry.update_version(db, row["id"], status="training", error=None)
    registry.add_event(db, corpus["id"], "train_started", f"training v{row['number']} (run {run_id})",
                       {"preset": preset, "p": cfg.p})
    began = time.perf_counter()
    try:
        documents = version_documents(db, row)
        sampler = ChunkSampler(documents, None if lm.spec == "default" else lm.spec)
        folder = synth_dir(corpus, row["number"])
        _prepare_synth_dir(folder, _synth_settings(cfg, lm.fingerprint, corpus, row))

        # 1. Plan: fixed and recorded before any work, so that a resumed run trains on the same data.
        plan = Plan.from_config(saved) if previous is not None else None
        if plan is None:
            plan = make_plan(db, corpus, row, lm, cfg, documents, incremental)
        config_doc["plan"] = plan.to_json()
        report(Progress("plan", message=plan_message(plan, cfg, int(row["tokens"] or 0), lm.device.type)))
        if plan.kind == "incremental":
            config_doc["incremental"] = plan.summary()
        registry.update_run_config(db, run_id, config_doc)

        # 2. Synthesize what the plan still lacks.
        def on_synth(progress: Progress) -> None:
            report(progress)
            registry.add_metric(db, run_id, "synthesis", progress.done, data={"rate": progress.rate})

        warm_start = None
        synthesized = None
        if plan.kind == "incremental":
            if previous is None or count_conversations(folder) < plan.reused:  # a new plan starts from its reuse
                shutil.rmtree(folder, ignore_errors=True)
                _prepare_synth_dir(folder, _synth_settings(cfg, lm.fingerprint, corpus, row))
                _write_in_shards(folder, reused_conversations(db, corpus, plan.from_version, documents)[: plan.reused])
            warm_start = previous_cartridge(db, corpus, plan.from_version, lm)
        if plan.new or plan.kind == "full":
            from engine.selfstudy.synthesis import synthesis_backend as resolve_backend

            # resolved once: what the JSON names is what ran
            synthesized = "server" if server is not None else resolve_backend(lm, synthesis_backend)
            synthesize_version(lm, sampler, folder, cfg, backend=synthesized, on_progress=on_synth,
                               should_stop=should_stop, target=plan.conversations,
                               only_files=set(plan.changed_files) if plan.kind == "incremental" else None,
                               server=server, concurrency=concurrency)
        if should_stop and should_stop():
            return _stopped(db, corpus, row, run_id)

        # 3. The training set the plan names.
        every = read_conversations(folder)[: plan.conversations]
        if plan.kind == "incremental":
            fresh = every[plan.reused:]
            conversations = fresh + _replay(every[:plan.reused], len(fresh), cfg)
            if cfg.steps is None:
                cfg = cfg.replace(steps=max(1, math.ceil(cfg.train_examples(len(conversations)) / cfg.batch_size)))
                config_doc["train"] = asdict(cfg)
                registry.update_run_config(db, run_id, config_doc)
        else:
            conversations = every
        if not conversations:
            raise UserError("self-study produced no usable conversations")
        conversations, heldout = split_heldout(conversations, cfg.heldout, cfg.seed)
        n_selfstudy = len(conversations)  # what `train` reports; quoting conversations come on top
        if cfg.rag > 0:  # the passages cartridge+rag would add, from this version only
            conversations = with_passages(db, row, conversations, cfg, lm.tokenizer)
        if cfg.verbatim > 0:  # the folder's own words beside self-study (changed files only when incremental)
            k = conversations[0].topk_ids.shape[1]
            conversations = conversations + verbatim_conversations(
                lm.tokenizer, sampler, verbatim_count(len(conversations), cfg.verbatim), cfg.seed, k=k,
                only_files=set(plan.changed_files) if plan.kind == "incremental" else None, cloze=cfg.cloze,
                topics=cfg.topics, spread=cfg.quotes == "spread")
            if heldout:  # recall probes: the kept state must also know the folder's words (distill.HeldOut)
                heldout = heldout + verbatim_conversations(
                    lm.tokenizer, sampler, max(4, verbatim_count(len(heldout), cfg.verbatim)), f"{cfg.seed}-probes", k=k)

        # 4. Distill, from the corpus's own tokens (full) or the previous cartridge (incremental).
        if warm_start is None:
            peft_model = create_cartridge_model(lm, cfg.p, embeddings=init_embeddings(lm, sampler, cfg.p, cfg.init))
        else:
            peft_model = create_cartridge_model(lm, cfg.p, embeddings=warm_start)

        def on_step(m: StepMetrics) -> None:
            report(Progress("training", m.step, m.total_steps, m.eta_s, m.tokens_per_s, m.loss))
            registry.add_metric(db, run_id, "training", m.step, loss=m.loss, tokens_per_s=m.tokens_per_s,
                                elapsed_s=m.elapsed_s)

        checkpoint_dir = run_dir(corpus, run_id) / "checkpoint"
        if nproc > 1:
            from engine.training.distributed import distill_across

            result = distill_across(nproc, peft_model, lm, model, conversations, cfg, on_step=on_step,
                                    checkpoint_dir=checkpoint_dir, resume=resume, should_stop=should_stop,
                                    heldout=heldout)
        else:
            result = distill(peft_model, lm, conversations, cfg, on_step=on_step, checkpoint_dir=checkpoint_dir,
                             resume=resume, should_stop=should_stop, heldout=heldout)
        if result.stopped:
            _unwrap(peft_model)
            return _stopped(db, corpus, row, run_id)
        report(Progress("save", message="writing the cartridge"))
        seconds = time.perf_counter() - began
        metrics = {"incremental": config_doc.get("incremental"), "loss_first": result.loss_first, "loss_last": result.loss_last, "steps": result.steps,
                   "conversations": len(conversations), "seconds": round(seconds, 1),
                   "tokens_per_s": round(result.tokens_per_s, 1), "heldout": result.heldout}
        score = result.heldout["score"] if result.heldout else None
        # A fresh folder per run: the serving cartridge stays on disk until the registry points elsewhere.
        target = cartridges_dir() / corpus["uid"] / f"v{row['number']}-run{run_id}"
        previous = db["versions"].get(row["id"])["cartridge"]
        weights = cartridge_embeddings(peft_model)
        if out_of_range(weights):  # without held-out conversations nothing else would catch it
            raise UserError("training diverged: the cartridge holds NaN or infinite values, or values too large "
                            "for a KV cache, so it was not saved (try a smaller --lr)")
        save_cartridge(weights, peft_config_for(cfg.p), target, {
            "base_model": lm.spec, "fingerprint": lm.fingerprint, "p": cfg.p, "n_layers": lm.n_layers,
            "n_kv_heads": lm.n_kv_heads, "head_dim": lm.head_dim, "corpus": corpus["name"],
            "corpus_root": corpus["root"], "version": row["number"], "manifest_hash": row["manifest_hash"],
            "training": config_doc, "metrics": metrics, "created": time.time()})
        _unwrap(peft_model)
        serving = _comparable_serving(db, corpus, row, cfg) if guard_current and score is not None else None
        paired = _paired_scores(lm, target, serving, heldout, cfg) if serving is not None else None
        worse = _older_than_serving(db, corpus, row) or _worse_than_serving(corpus, row, serving, paired)
        with registry.transaction(db):
            registry.update_version(db, row["id"], status="ready", cartridge=str(target), error=None, heldout=score)
            if worse is None:
                registry.update_corpus(db, corpus["id"], current_version=row["number"])
            registry.finish_run(db, run_id, "done", cartridge=str(target), summary=metrics)
            registry.add_event(db, corpus["id"], "train_finished", f"v{row['number']} is ready", metrics)
            if worse is not None:
                registry.add_event(db, corpus["id"], "kept_previous", worse,
                                   {"version": row["number"], "heldout": score, "paired": paired})
        if previous and Path(previous) != target:
            shutil.rmtree(previous, ignore_errors=True)
        shutil.rmtree(run_dir(corpus, run_id), ignore_errors=True)
        report(Progress("done", 1, 1, message="ready" if worse is None else worse))
        # What made this run's conversations (None: all were reused) and what trained the cartridge.
        engines = {"synthesis": "llama.cpp" if synthesized == "llamacpp" else synthesized, "training": "torch",
                   "device": lm.device.type, "processes": nproc}
        if synthesized == "server":
            engines["server"] = server.describe()
        return TrainOutcome(corpus["name"], row["number"], str(target), cfg.p, n_selfstudy, result.steps,
                            result.loss_first, result.loss_last, seconds, run_id, result.heldout, worse is None, worse,
                            engines)
    except KeyboardInterrupt:
        _stopped(db, corpus, row, run_id, status="interrupted")
        raise
    except Exception as exc:
        from engine.engines.server import ServerError

        if isinstance(exc, ServerError):  # what the server made is saved: resume once it answers again
            _stopped(db, corpus, row, run_id, status="interrupted")
            raise ServerError(f"{exc}. The conversations made so far are saved: run `cartridge train "
                              f"{corpus['name']} --resume` once the server answers again.") from None
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
    finally:
        if server is not None:
            server.close()


def _older_than_serving(db, corpus: dict, row: dict) -> str | None:
    """Why a retrained older version should not replace a newer ready one that serves, or None."""
    serving = db["corpora"].get(corpus["id"])["current_version"]
    if serving is None or serving <= row["number"] or registry.get_version(db, corpus, serving)["status"] != "ready":
        return None
    return (f"v{row['number']} is older than v{serving}, which keeps serving "
            f"(`cartridge versions {corpus['name']} --make-current {row['number']}` to use it)")


def _comparable_serving(db, corpus: dict, row: dict, cfg: TrainConfig) -> dict | None:
    """The version that serves, if a new version's held-out score can be compared with it: ready, another
    version, and trained with the same share of quoting conversations (a cartridge that also learns the
    folder's own words imitates the teacher less, a lower score, while answering better)."""
    serving = db["corpora"].get(corpus["id"])["current_version"]
    if serving is None or serving == row["number"]:
        return None
    current = registry.get_version(db, corpus, serving)
    if current["status"] != "ready" or trained_setting(current["cartridge"], "verbatim", 0.0) != cfg.verbatim:
        return None
    return current


def _paired_scores(lm, target: Path, serving: dict, heldout: list, cfg: TrainConfig) -> tuple[float, float] | None:
    """The new and the serving cartridge's held-out scores on the same questions, or None (fewer than two,
    or a cartridge that cannot be read). Each run holds out different questions, and scores on different
    questions differ by far more than the margin; on the same ones they differ by the cartridges alone.
    The questions are the held-out ones new to this version: an incremental run also holds out reused
    conversations, which the serving cartridge trained on."""
    fresh = [c for c in heldout if c.seed_type != "verbatim" and c.slot is not None]
    if len(fresh) < 2:
        return None
    new, theirs = _score_on(lm, target, fresh, cfg), _score_on(lm, Path(serving["cartridge"]), fresh, cfg)
    return None if new is None or theirs is None else (new, theirs)


def _score_on(lm, folder: Path, questions: list, cfg: TrainConfig) -> float | None:
    """A saved cartridge's held-out score on `questions`, or None when it cannot be read or scored."""
    from engine.cartridge.format import create_cartridge_model, load_cartridge
    from engine.training.distill import HeldOut

    try:
        embeddings = load_cartridge(folder, lm).embeddings
    except UserError:
        return None
    p = int(embeddings.shape[0])
    model = None
    try:
        scored = HeldOut(lm, questions, cfg, p)
        if not scored:
            return None
        model = create_cartridge_model(lm, p, embeddings=embeddings)
        return scored.score(scored.nll(model))
    except RuntimeError:  # out of memory, say: the comparison is skipped, not the finished training
        return None
    finally:
        if model is not None:
            _unwrap(model)


def _worse_than_serving(corpus: dict, row: dict, serving: dict | None,
                        paired: tuple[float, float] | None) -> str | None:
    """Why a new version should not replace the serving one (its held-out score clearly below the serving
    cartridge's on the same questions), or None."""
    if serving is None or paired is None or paired[0] >= paired[1] - WORSE_MARGIN:
        return None
    return (f"v{row['number']} scored {paired[0]:.2f} on held-out questions, clearly below v{serving['number']}'s "
            f"{paired[1]:.2f} on the same questions: v{serving['number']} keeps serving "
            f"(`cartridge versions {corpus['name']} --make-current {row['number']}` to use it anyway)")


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
