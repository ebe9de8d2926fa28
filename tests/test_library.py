"""Library summaries on a real registry: status words, stale counts, cartridge facts, eval records, chat export."""

import json

from conftest import write

from engine.store import library, registry
from engine.corpus.ingest import ingest


def _fake_cartridge(folder, p=8, size=4096):
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * size)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "cartridge.json").write_text(json.dumps({"p": p, "created": 1_700_000_000.0, "base_model": "default"}))
    return folder


def _mark_ready(db, corpus_name, number, folder):
    corpus = registry.get_corpus(db, corpus_name)
    version = registry.get_version(db, corpus, number)
    registry.update_version(db, version["id"], status="ready", cartridge=str(folder))
    registry.set_current_version(db, corpus, number)


def test_status_words():
    v = lambda n, status="scanned", error=None: {"number": n, "status": status, "error": error}  # noqa: E731
    assert library.corpus_status([v(1)], None)["kind"] == "untrained"
    assert library.corpus_status([v(1, "ready")], 1) == {"kind": "ready", "label": "ready", "stale_by": 0,
                                                         "error": None}
    stale = library.corpus_status([v(1, "ready"), v(2), v(3)], 1)
    assert stale["kind"] == "stale" and stale["stale_by"] == 2 and stale["label"] == "stale since 2 changes"
    assert library.corpus_status([v(1, "ready"), v(2)], 1)["label"] == "stale since 1 change"
    failed = library.corpus_status([v(1, "ready"), v(2, "failed", "out of memory")], 1)
    assert failed["kind"] == "failed" and failed["error"] == "out of memory"
    assert library.corpus_status([v(1, "interrupted")], None)["kind"] == "interrupted"
    assert library.corpus_status([v(1, "ready"), v(2)], 1, training=True)["kind"] == "training"


def test_summaries_versions_and_manifest(tmp_path, db):
    root = tmp_path / "notes"
    write(root, "a.md", "The lighthouse keeper logs the weather at dawn.\n")
    write(root, "b.bin", b"\x00\x01\x02" * 50)
    ingest(root, db=db)
    [summary] = library.corpus_summaries(db)
    assert summary["name"] == "notes" and summary["status_kind"] == "untrained" and summary["cartridge_mb"] is None
    assert summary["versions"] == 1 and summary["files"] == 1 and summary["tokens"] > 0

    _mark_ready(db, "notes", 1, _fake_cartridge(tmp_path / "cart1", p=8, size=2_000_000))
    write(root, "c.md", "A second note about the fog horn.\n")
    ingest(root, db=db)
    [summary] = library.corpus_summaries(db)
    assert summary["status"] == "stale since 1 change" and summary["current_version"] == 1
    assert summary["p"] == 8 and summary["cartridge_mb"] == 2.0 and summary["trained"] == 1_700_000_000.0
    assert library.corpus_summaries(db, busy={"notes"})[0]["status_kind"] == "training"

    rows = library.version_rows(db, "notes")
    assert [r["number"] for r in rows] == [2, 1] and rows[1]["current"] and rows[1]["p"] == 8
    assert rows[0]["status"] == "scanned" and rows[0]["cartridge_mb"] is None

    manifest = library.catalog_manifest(db, "notes")
    assert [r["path"] for r in manifest] == ["a.md", "c.md", "b.bin"]
    totals = library.manifest_summary(manifest)
    assert totals["included"] == 2 and totals["skipped"] == 1 and totals["warning"] is None and totals["icl_fits"]
    assert totals["tokens"] == sum(r["tokens"] for r in manifest if r["tokens"])


def test_budget_warning_and_reason_groups():
    assert library.budget_warning(50_000) is None
    assert "100,000" in library.budget_warning(400_000) and "400,000" in library.budget_warning(400_000)
    assert library.budget_warning(400_000, gpu=True) is None
    files = [{"path": "x", "status": "skipped", "reason": "too large (2,000,000 bytes > 1,000,000)", "tokens": None},
             {"path": "y", "status": "skipped", "reason": "too large (3,000,000 bytes > 1,000,000)", "tokens": None},
             {"path": "z", "status": "included", "reason": None, "tokens": 200_000}]
    summary = library.manifest_summary(files)
    assert summary["reasons"] == [("too large", 2)] and summary["warning"] and not summary["icl_fits"]


def test_eval_record_shows_in_summary(tmp_path, db):
    write(tmp_path / "docs", "a.md", "Some text.\n")
    ingest(tmp_path / "docs", db=db)
    result = {"corpus": "docs", "version": 1, "questions": 3, "model": "default", "recovered": 0.5,
              "modes": {m: {"nll": n, "kv_bytes": 1000, "ttft_s": 0.1, "per_question": [n]}
                        for m, n in (("none", 3.0), ("icl", 1.0), ("cartridge", 2.0))}}
    library.record_eval(db, result, "qa.jsonl")
    [summary] = library.corpus_summaries(db)
    assert summary["eval"]["recovered"] == 0.5 and summary["eval"]["modes"]["icl"]["nll"] == 1.0
    assert "per_question" not in summary["eval"]["modes"]["none"]
    assert library.eval_brief(summary["eval"]) == "v1: NLL 2.00 (icl 1.00, none 3.00) 50% recovered"
    assert library.eval_brief(None) == ""


def test_chat_markdown_and_runs(db):
    chat_id = registry.create_chat(db, library.chat_title("What does the keeper log at dawn?  " * 3), ["notes"],
                                   "cartridge")
    registry.add_message(db, chat_id, "user", "What does the keeper log?")
    registry.add_message(db, chat_id, "assistant", "The weather.",
                         {"mode": "cartridge", "versions": [{"corpus": "notes", "version": 2}], "ttft_s": 0.25,
                          "tokens_per_s": 12.0})
    chat = registry.get_chat(db, chat_id)
    assert len(chat["title"]) <= 60 and chat["title"].endswith("…")
    text = library.chat_markdown(chat)
    assert text.startswith("# What does the keeper log at dawn?")
    assert "**You:**\n\nWhat does the keeper log?" in text and "**Assistant:**\n\nThe weather." in text
    assert "*notes v2 (cartridge) · first token 0.25 s · 12.0 tokens/s*" in text
    assert library.export_name(chat).startswith(f"chat-{chat_id}-what-does-the-keeper") and library.export_name(
        chat).endswith(".md")
    assert library.answer_footer({"mode": "none", "versions": []}) == "no corpus (none)"


def test_loss_curve_keeps_last_value_per_step(tmp_path, db):
    write(tmp_path / "docs", "a.md", "Some text.\n")
    result = ingest(tmp_path / "docs", db=db)
    run_id = registry.start_run(db, result.corpus["id"], result.version["id"], {}, pid=1, pid_started=None)
    registry.add_metric(db, run_id, "synthesis", 1)
    for step, loss in ((1, 3.0), (2, 2.5), (2, 2.4), (3, 2.0)):
        registry.add_metric(db, run_id, "training", step, loss=loss, tokens_per_s=100.0)
    assert [(p["step"], p["loss"]) for p in library.loss_curve(db, run_id)] == [(1, 3.0), (2, 2.4), (3, 2.0)]
    assert library.latest_run(db, "docs")["id"] == run_id and library.latest_run(db, "nope") is None


def test_friendly_error():
    assert library.friendly_error("out of memory (x): try a smaller --tokens or batch size") == \
        "out of memory (x): try a smaller p (virtual tokens) or batch size"
    assert library.friendly_error("'a' v1 has no trained cartridge yet: run `cartridge train a`") == \
        "'a' v1 has no trained cartridge yet: train a on the Train tab"
