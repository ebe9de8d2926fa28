"""What a front end shows about the library: corpus status, cartridge facts, manifests, eval records, chats.

Read-only summaries built from registry functions (plus the cartridge metadata files), so the UI stays a
thin layer and these rules are testable on their own.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

from engine.cartridge.metadata import cartridge_p, read_metadata
from engine.store import registry

# Beyond this many tokens, a cartridge for the default model trained on a CPU covers the folder thinly:
# the quick preset sees ~96 chunks of 512 tokens (about 50k tokens of text), so a folder twice that size is
# mostly unseen. A GPU and a bigger preset move the limit up.
CPU_TOKEN_BUDGET = 100_000
GPU_TOKEN_BUDGET = 2_000_000
DEFAULT_CONTEXT = 8192  # positions of the default model: the in-context (icl) comparison needs the folder to fit


# -- cartridges ------------------------------------------------------------------------------------

def cartridge_info(folder: str | Path | None) -> dict | None:
    """p, size on disk, creation time, base model and training metrics of a cartridge folder (None if absent)."""
    if not folder:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        return None
    meta = read_metadata(folder)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return {"p": cartridge_p(meta), "size_bytes": size, "size_mb": round(size / 1e6, 2), "created": meta.get("created"),
            "base_model": meta.get("base_model"), "metrics": meta.get("metrics") or {}, "folder": str(folder)}


# -- status ----------------------------------------------------------------------------------------

def corpus_status(versions: list[dict], current: int | None, training: bool = False) -> dict:
    """The one-word state of a corpus and what stands behind it.

    kind: training | failed | interrupted | ready | stale | untrained.
    `stale_by` counts the versions newer than the current (trained) one: changes not yet in its cartridge.
    """
    latest = versions[-1] if versions else None
    pending = latest is not None and (current is None or latest["number"] > current)  # newest not yet current
    newer = [v for v in versions if current is not None and v["number"] > current]
    stale_by = len(newer) if current is not None else 0
    if training:
        kind, label = "training", "training"
    elif pending and latest["status"] == "failed":
        kind, label = "failed", "failed"
    elif pending and latest["status"] in ("interrupted", "training"):
        kind, label = "interrupted", "interrupted (resume it on the Train tab)"
    elif current is None:
        kind, label = "untrained", "not trained yet"
    elif stale_by:
        kind, label = "stale", f"stale since {stale_by} change{'s' if stale_by != 1 else ''}"
    else:
        kind, label = "ready", "ready"
    error = latest["error"] if latest is not None and kind == "failed" else None
    return {"kind": kind, "label": label, "stale_by": stale_by, "error": error}


def corpus_summary(db, corpus: dict, busy: set[str] | frozenset = frozenset()) -> dict:
    versions = registry.list_versions(db, corpus["id"])
    current = corpus["current_version"]
    running = bool(registry.list_runs(db, corpus["id"], status="running"))
    status = corpus_status(versions, current, training=corpus["name"] in busy or running)
    latest = versions[-1] if versions else None
    current_row = next((v for v in versions if v["number"] == current), None)
    info = cartridge_info(current_row["cartridge"]) if current_row else None
    trained = None
    if current_row is not None:
        done = [r for r in registry.list_runs(db, corpus["id"], status="done") if r["version_id"] == current_row["id"]]
        trained = done[-1]["finished"] if done else (info or {}).get("created")
    evaluation = latest_eval(db, corpus["id"])
    return {
        "name": corpus["name"], "root": corpus["root"], "status": status["label"], "status_kind": status["kind"],
        "stale_by": status["stale_by"], "error": status["error"], "current_version": current,
        "latest_version": latest["number"] if latest else None, "versions": len(versions),
        "files": latest["files"] if latest else 0, "tokens": latest["tokens"] if latest else 0,
        "cartridge_mb": info["size_mb"] if info else None, "p": info["p"] if info else None,
        "trained": trained, "eval": evaluation, "watch": bool(corpus.get("watch")),
        "heldout": current_row.get("heldout") if current_row else None,
    }


def corpus_summaries(db, busy: set[str] | frozenset = frozenset()) -> list[dict]:
    """One summary per corpus, by name; `busy` names corpora with a queued or running job."""
    return [corpus_summary(db, c, busy) for c in registry.list_corpora(db)]


def version_rows(db, corpus_name: str) -> list[dict]:
    """The versions of a corpus, newest first, with their cartridge facts."""
    corpus = registry.get_corpus(db, corpus_name)
    rows = []
    for v in reversed(registry.list_versions(db, corpus["id"])):
        info = cartridge_info(v["cartridge"]) if v["status"] == "ready" else None
        rows.append({"number": v["number"], "current": v["number"] == corpus["current_version"],
                     "status": v["status"], "files": v["files"], "tokens": v["tokens"], "created": v["created"],
                     "p": info["p"] if info else None, "cartridge_mb": info["size_mb"] if info else None,
                     "error": v["error"], "heldout": v.get("heldout")})
    return rows


# -- manifests -------------------------------------------------------------------------------------

def budget_warning(tokens: int, *, gpu: bool = False) -> str | None:
    """A warning when a folder is far larger than a cartridge trained here can cover well."""
    budget = GPU_TOKEN_BUDGET if gpu else CPU_TOKEN_BUDGET
    if tokens <= budget:
        return None
    where = "a GPU" if gpu else "a CPU with the default model"
    return (f"This folder holds {tokens:,} tokens, far more than a cartridge trained on {where} covers well "
            f"(about {budget:,}). Point at a sub-folder, add exclude patterns, or use a bigger preset on a GPU.")


def icl_fits(tokens: int, context: int = DEFAULT_CONTEXT) -> bool:
    """Whether the whole folder fits the default model's context (needed by the icl comparison)."""
    return tokens + 768 <= context


def manifest_summary(files: list[dict]) -> dict:
    """Totals of a manifest given as [{path, status, reason, tokens}]."""
    included = [f for f in files if f["status"] == "included"]
    skipped = [f for f in files if f["status"] != "included"]
    tokens = sum(f.get("tokens") or 0 for f in included)
    return {"included": len(included), "skipped": len(skipped), "tokens": tokens,
            "reasons": Counter(_reason_group(f.get("reason")) for f in skipped).most_common(),
            "warning": budget_warning(tokens), "icl_fits": icl_fits(tokens)}


def _reason_group(reason: str | None) -> str:
    """Collapse per-file details (sizes) so reasons group: 'too large (1,234 bytes > ...)' -> 'too large'."""
    return re.sub(r"\s*\(.*\)$", "", reason or "skipped")


def catalog_manifest(db, corpus_name: str) -> list[dict]:
    """The last scan of a corpus as manifest rows, included files first, then skipped ones, by path."""
    corpus = registry.get_corpus(db, corpus_name)
    rows = [{"path": r["path"], "status": r["status"], "reason": r["reason"], "tokens": r["tokens"]}
            for r in registry.file_catalog(db, corpus["id"]).values()]
    return sorted(rows, key=lambda r: (r["status"] != "included", r["path"]))


# -- training runs ---------------------------------------------------------------------------------

def latest_run(db, corpus_name: str) -> dict | None:
    corpus = registry.find_corpus(db, name=corpus_name)
    if corpus is None:
        return None
    runs = registry.list_runs(db, corpus["id"])
    return runs[-1] if runs else None


def loss_curve(db, run_id: int) -> list[dict]:
    """[{step, loss, tokens_per_s}] of a run's training steps (resumed runs: the last value per step)."""
    by_step: dict[int, dict] = {}
    for m in registry.run_metrics(db, run_id, phase="training"):
        if m["loss"] is not None:
            by_step[m["step"]] = {"step": m["step"], "loss": m["loss"], "tokens_per_s": m["tokens_per_s"]}
    return [by_step[s] for s in sorted(by_step)]


# -- evaluations -----------------------------------------------------------------------------------

def record_eval(db, result: dict, qa_name: str | None = None) -> None:
    """Keep an evaluation's figures as an event of its corpus (the library shows the latest)."""
    corpus = registry.get_corpus(db, result["corpus"])
    modes = {m: {k: f[k] for k in ("nll", "accuracy", "kv_bytes", "ttft_s") if k in f}
             for m, f in result["modes"].items()}
    data = {"version": result["version"], "questions": result["questions"], "model": result.get("model"),
            "modes": modes, "recovered": result.get("recovered"), "qa": qa_name}
    parts = [f"{m} {f['nll']:.3f}" for m, f in modes.items()]
    registry.add_event(db, corpus["id"], "eval", f"eval of v{result['version']}: answer NLL " + ", ".join(parts), data)


def latest_eval(db, corpus_id: int) -> dict | None:
    for event in registry.list_events(db, corpus_id, limit=200):
        if event["kind"] == "eval" and event["data"]:
            return {**json.loads(event["data"]), "created": event["created"]}
    return None


def eval_brief(evaluation: dict | None) -> str:
    """'v2 · cartridge 1.23 (icl 1.10, none 2.05) · 81% recovered' or '' when there is none."""
    if not evaluation:
        return ""
    modes = evaluation["modes"]
    parts = []
    if "cartridge" in modes:
        parts.append(f"NLL {modes['cartridge']['nll']:.2f}")
        if "accuracy" in modes["cartridge"]:
            parts.append(f"accuracy {modes['cartridge']['accuracy']:.0%}")
    others = [f"{m} {modes[m]['nll']:.2f}" for m in ("icl", "none") if m in modes]
    if others:
        parts.append("(" + ", ".join(others) + ")")
    if evaluation.get("recovered") is not None:
        parts.append(f"{evaluation['recovered']:.0%} recovered")
    return f"v{evaluation['version']}: " + " ".join(parts)


# -- chats -----------------------------------------------------------------------------------------

def chat_title(message: str, limit: int = 60) -> str:
    words = " ".join(message.split())
    return words if len(words) <= limit else words[: limit - 1].rstrip() + "…"


def answer_footer(meta: dict) -> str:
    """One line under an answer: what answered, and how fast."""
    if not meta:
        return ""
    versions = meta.get("versions") or []
    mode = meta.get("mode", "")
    if mode == "cartridge" and versions:
        who = " + ".join(f"{v['corpus']} v{v['version']}" for v in versions) + " (cartridge)"
    elif mode == "icl":
        who = " + ".join(f"{v['corpus']} v{v['version']}" for v in versions) + " in context (icl)"
    elif mode in ("rag", "cartridge+rag"):
        what = "cartridge + retrieved passages" if mode == "cartridge+rag" else "retrieved passages (rag)"
        who = " + ".join(f"{v['corpus']} v{v['version']}" for v in versions) + f" {what}"
        from engine.corpus.retrieval import source_label

        used = ", ".join(source_label(s) for s in meta.get("sources") or [])
        who += f" · sources: {used or 'none found'}"
    else:
        who = "no corpus (none)"
    parts = [who]
    if meta.get("ttft_s") is not None:
        parts.append(f"first token {meta['ttft_s']:.2f} s")
    if meta.get("tokens_per_s") is not None:
        parts.append(f"{meta['tokens_per_s']:.1f} tokens/s")
    if meta.get("stopped"):
        parts.append("stopped")
    return " · ".join(parts)


def chat_markdown(chat: dict) -> str:
    """A chat (registry.get_chat) as a Markdown document."""
    corpora = ", ".join(chat["corpora"]) or "no corpus"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat["created"]))
    lines = [f"# {chat['title']}", "", f"*{corpora} · mode {chat['mode']} · started {started}*", ""]
    for m in chat["messages"]:
        who = "You" if m["role"] == "user" else "Assistant"
        lines += [f"**{who}:**", "", m["content"].strip(), ""]
        footer = answer_footer(m["meta"]) if m["role"] == "assistant" else ""
        if footer:
            lines += [f"*{footer}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def export_name(chat: dict) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", chat["title"]).strip("-").lower()[:40] or "chat"
    return f"chat-{chat['id']}-{slug}.md"


# -- messages --------------------------------------------------------------------------------------

_CLI_WORDS = [("--tokens", "p (virtual tokens)"), ("--batch-size", "batch size"), ("--conversations", "conversations"),
              ("--steps", "steps"), ("--version", "version"), ("--resume", "resume")]


def friendly_error(message: str) -> str:
    """An engine message with command-line wording replaced by the names the app's forms use."""
    text = str(message)
    text = re.sub(r"run `cartridge train ([^`]+)`", r"train \1 on the Train tab", text)
    text = re.sub(r"run `cartridge ingest[^`]*`", "add a folder on the Library tab", text)
    text = text.replace("train without --resume", "train again without resume")
    text = text.replace("--version applies to one corpus; give one corpus or leave --version out",
                        "a chosen version applies to one corpus; pick one corpus or use the current versions")
    for flag, words in _CLI_WORDS:
        text = text.replace(flag, words)
    return text
