"""Removing a corpus deletes what the app made for it, and nothing of it reaches a later corpus."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli, write
from engine.store import registry
from engine.selfstudy.conversations import read_conversations
from engine.training.pipeline import corpus_folders, synth_dir
from engine.engines.tokenizer import load_tokenizer

SECRET = "Brackwater Vault code 7781 belongs to Imogen Tarrow"
TINY = ["--tokens", "8", "--conversations", "4", "--steps", "1", "--chunk-tokens", "64", "--batch-size", "2",
        "--init", "spread"]


def notes(root, secret: str = ""):
    for i in range(3):
        write(root, f"note{i}.md", f"# Note {i}\n\n{secret} " * (3 if secret else 0)
              + f"The allotment shed number {i} keeps spades, rakes and twine for the spring planting season.\n" * 6)
    return root


def test_removed_corpus_leaves_nothing_and_reaches_no_later_corpus(tmp_path, cartridge_home):
    private = notes(tmp_path / "private", SECRET)
    assert run_cli("ingest", str(private), "--name", "notes", env_home=cartridge_home).returncode == 0
    assert run_cli("train", "notes", *TINY, env_home=cartridge_home).returncode == 0, "train private"
    db = registry.open_registry()
    first = registry.get_corpus(db, "notes")
    folders = corpus_folders(first)
    assert synth_dir(first, 1).is_dir() and any(f.exists() for f in folders)

    chat = registry.create_chat(db, "vault", ["notes"], "cartridge")
    registry.add_message(db, chat, "assistant", SECRET)
    kept = registry.create_chat(db, "other", ["garden"], "none")
    registry.rename_corpus(db, "notes", "vault notes")  # its chats follow the new name ...
    assert registry.get_chat(db, chat)["corpora"] == ["vault notes"]
    registry.rename_corpus(db, "vault notes", "notes")  # ... and back

    proc = run_cli("remove", "notes", "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["removed"] is True
    assert not any(f.exists() for f in folders)  # conversations, checkpoints and cartridges are gone
    assert private.is_dir() and len(list(private.iterdir())) == 3  # the user's folder is untouched
    db = registry.open_registry()
    assert [c["id"] for c in registry.list_chats(db)] == [kept]  # chats that quote it go with it
    assert not list(db["messages"].rows_where("content LIKE ?", ["%Brackwater%"]))

    # A new folder under the same name (and, in SQLite, possibly the same row id) starts from nothing.
    public = notes(tmp_path / "public")
    assert run_cli("ingest", str(public), "--name", "notes", env_home=cartridge_home).returncode == 0
    assert run_cli("train", "notes", *TINY, env_home=cartridge_home).returncode == 0, "train public"
    db = registry.open_registry()
    second = registry.get_corpus(db, "notes")
    assert second["uid"] != first["uid"]
    tokenizer = load_tokenizer(None)
    conversations = read_conversations(synth_dir(second, 1))
    assert conversations
    for c in conversations:
        text = c.user + tokenizer.decode(c.answer_ids.tolist())
        assert "Brackwater" not in text and "7781" not in text and "Tarrow" not in text, text
    cartridge = Path(registry.get_version(db, second, 1)["cartridge"])
    assert cartridge.parent.name == second["uid"]
    assert json.loads((cartridge / "cartridge.json").read_text())["corpus_root"] == str(public.resolve())

    missing = run_cli("remove", "nope", env_home=cartridge_home)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no corpus named 'nope'")


def test_removed_text_is_not_left_in_the_registry_file(tmp_path, cartridge_home):
    """Not in free pages, not in the full-text index's older segments, not in the write-ahead log."""
    private = tmp_path / "private"
    write(private, "quillfeather-ledger.md", f"# Ledger\n\n{SECRET}.\n" * 40)
    garden = notes(tmp_path / "garden")
    for folder in (private, garden):
        assert run_cli("ingest", str(folder), env_home=cartridge_home).returncode == 0
    files = [cartridge_home / "registry.db", cartridge_home / "registry.db-wal"]
    stored = b"".join(f.read_bytes() for f in files if f.exists()).lower()
    assert b"brackwater" in stored and b"quillfeather" in stored  # the check below can fail
    proc = run_cli("remove", "private", "--json", env_home=cartridge_home)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["scrubbed"] is True
    stored = b"".join(f.read_bytes() for f in files if f.exists()).lower()
    assert b"brackwater" not in stored and b"imogen" not in stored and b"quillfeather" not in stored
    assert b"allotment" in stored  # the other corpus is still there


def test_a_removal_stopped_half_way_is_finished_by_the_next_one(tmp_path, db):
    """Killed after its registry transaction, a removal left its folders (nothing names them any more); the
    next removal deletes them too, and nothing of a corpus still known."""
    import uuid

    from engine.corpus.ingest import ingest
    from engine.training.pipeline import remove_corpus

    for name in ("club", "garden"):
        ingest(notes(tmp_path / name), db=db)
    kept = {"uid": registry.get_corpus(db, "garden")["uid"]}
    orphan = {"uid": uuid.uuid4().hex}
    for corpus in (kept, orphan):
        for folder in corpus_folders(corpus):
            write(folder, "v1/part.txt", SECRET)
    remove_corpus(db, "club")
    assert not any(folder.exists() for folder in corpus_folders(orphan))
    assert all((folder / "v1" / "part.txt").exists() for folder in corpus_folders(kept))
