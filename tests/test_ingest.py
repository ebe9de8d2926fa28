"""Ingestion on real files and a real registry: every skip rule and change detection."""

import os
import time

import pytest

from conftest import write
from engine.store import registry
from engine.errors import UserError
from engine.corpus.ingest import ScanOptions, ingest


def statuses(result):
    return {f.path: (f.status, f.reason) for f in result.files}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "notes"
    write(root, "README.md", "# Notes\nThe harbour opens at nine.\n")
    write(root, "src/app.py", "print('hello')\n")
    return root


def test_builtin_excludes_and_lock_files(folder, db):
    write(folder, ".git/config", "[core]\n")
    write(folder, "node_modules/lib/index.js", "module.exports = 1\n")
    write(folder, ".venv/lib/site.py", "x = 1\n")
    write(folder, "src/__pycache__/app.cpython-311.pyc", b"\x00\x01")
    write(folder, "package-lock.json", "{}\n")
    result = ingest(folder, db=db)
    s = statuses(result)
    assert s["README.md"] == ("included", None)
    assert s["src/app.py"] == ("included", None)
    for ignored in [".git/", "node_modules/", ".venv/", "src/__pycache__/", "package-lock.json"]:
        assert s[ignored] == ("skipped", "ignored"), ignored
    assert not any(p.startswith("node_modules/lib") for p in s)


def test_nested_gitignore_and_corpus_ignore_list(folder, db):
    write(folder, ".gitignore", "scratch/\n")
    write(folder, "scratch/todo.md", "later\n")
    write(folder, "sub/.gitignore", "*.log\n")
    write(folder, "sub/run.log", "log line\n")
    write(folder, "run.log", "top-level log is not covered by sub/.gitignore\n")
    write(folder, "drafts/idea.md", "an idea\n")
    s = statuses(ingest(folder, ignore=["drafts/"], db=db))
    assert s["scratch/"] == ("skipped", "ignored")
    assert s["sub/run.log"] == ("skipped", "ignored")
    assert s["run.log"] == ("included", None)
    assert s["drafts/"] == ("skipped", "ignored")
    # The ignore list is remembered for the next scan of the same folder.
    s = statuses(ingest(folder, db=db))
    assert s["drafts/"] == ("skipped", "ignored")


def test_text_detected_by_content_not_extension(folder, db):
    write(folder, "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    write(folder, "notes.bin", "plain words in a file with a binary-looking name\n")
    write(folder, "latin.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("cp1252"))
    write(folder, "wide.txt", "utf-16 text\n".encode("utf-16"))
    write(folder, "blank.md", "   \n\n")
    s = statuses(ingest(folder, db=db))
    assert s["image.txt"] == ("skipped", "binary")
    assert s["notes.bin"] == ("included", None)
    assert s["latin.txt"] == ("included", "decoded as cp1252")
    assert s["wide.txt"] == ("included", "decoded as utf-16")
    assert s["blank.md"] == ("skipped", "empty")


def test_size_caps(folder, db):
    write(folder, "big.md", "word " * 400)  # 2,000 bytes
    write(folder, "z1.md", "a" * 500)
    write(folder, "z2.md", "b" * 500)
    result = ingest(folder, options=ScanOptions(max_file_bytes=1000, max_total_bytes=1000), db=db)
    s = statuses(result)
    assert s["big.md"][0] == "skipped" and s["big.md"][1].startswith("too large")
    assert s["z2.md"][0] == "skipped" and s["z2.md"][1].startswith("total size cap reached")
    assert s["z1.md"] == ("included", None)


def test_secret_files_skipped_unless_opted_in(folder, db):
    for name in [".env", ".env.local", "id_rsa", "id_ed25519.pub", "server.pem", "tls.key", "credentials"]:
        write(folder, f"conf/{name}", "SECRET=1\n")
    s = statuses(ingest(folder, db=db))
    for name in [".env", ".env.local", "id_rsa", "id_ed25519.pub", "server.pem", "tls.key", "credentials"]:
        assert s[f"conf/{name}"] == ("skipped", "secret"), name
    s = statuses(ingest(folder, options=ScanOptions(allow_secrets=True), db=db))
    assert s["conf/.env"] == ("included", None)


def test_symlinks_stay_inside_and_never_loop(folder, tmp_path, db):
    outside = write(tmp_path / "elsewhere", "secret.md", "outside text\n")
    os.symlink(outside, folder / "link-out.md")
    os.symlink(tmp_path / "elsewhere", folder / "dir-out")
    os.symlink(folder, folder / "src" / "loop")
    os.symlink(folder / "README.md", folder / "readme-link.md")
    os.symlink(folder / "missing.md", folder / "dangling.md")
    s = statuses(ingest(folder, db=db))
    assert s["link-out.md"] == ("skipped", "symlink pointing outside the folder")
    assert s["dir-out"] == ("skipped", "symlink pointing outside the folder")
    assert s["src/loop/"][0] == "skipped"
    assert s["readme-link.md"] == ("included", None)
    assert s["dangling.md"] == ("skipped", "broken symlink")


def test_the_apps_own_files_are_never_read_into_a_corpus(folder, monkeypatch):
    """A data home inside the folder: its cartridges, settings and checkpoints (text files) are skipped, so a
    retrain never feeds the app's own files back in; the user's files beside them are read; a folder inside
    the app's own folders is refused."""
    home = folder / "work" / ".cd"
    monkeypatch.setenv("CARTRIDGE_HOME", str(home))
    db = registry.open_registry()
    write(home, "cartridges/abc/v1-run1/cartridge.json", '{"p": 16}\n')
    write(home, "synth/abc/v1/settings.json", '{"seed": 0}\n')
    write(home, "mine.md", "My own note, kept beside the app's files.\n")
    s = statuses(ingest(folder, db=db))
    assert s["work/.cd/cartridges/"] == s["work/.cd/synth/"] == ("skipped", "the app's data folder")
    assert s["work/.cd/mine.md"] == ("included", None)
    assert s["work/.cd/registry.db"][0] == "skipped"
    own = ("work/.cd/cartridges/", "work/.cd/synth/")
    assert not [p for p in s if p.startswith(own) and p not in own]  # not entered
    write(home, "cartridges/abc/v1-run2/cartridge.json", '{"p": 32}\n')  # a retrain writes here
    assert ingest(folder, db=db).changed is False
    with pytest.raises(UserError, match="one of the app's own data folders"):
        ingest(home / "cartridges", db=db)


def test_file_vanishing_mid_scan_is_skipped_and_scan_goes_on(folder, db):
    victim = write(folder, "zz/vanish.md", "here now\n")
    write(folder, "zz/zlast.md", "still here\n")

    def delete_when_reached(count, rel):
        if rel == "zz/vanish.md":
            victim.unlink()

    result = ingest(folder, db=db, on_progress=delete_when_reached)
    s = statuses(result)
    assert s["zz/vanish.md"] == ("skipped", "vanished during scan")
    assert s["zz/zlast.md"] == ("included", None)


def test_special_files_are_skipped(folder, db):
    os.mkfifo(folder / "pipe")
    s = statuses(ingest(folder, db=db))
    assert s["pipe"] == ("skipped", "not a regular file")


def test_change_detection_edit_add_delete_touch(folder, db):
    first = ingest(folder, db=db)
    assert first.changed and first.version["number"] == 1

    again = ingest(folder, db=db)
    assert not again.changed and again.version["number"] == 1

    os.utime(folder / "README.md", (time.time() + 5, time.time() + 5))  # touch, same content
    touched = ingest(folder, db=db)
    assert not touched.changed and touched.version["number"] == 1

    write(folder, "README.md", "# Notes\nThe harbour opens at ten.\n")
    edited = ingest(folder, db=db)
    assert edited.changed and edited.version["number"] == 2

    write(folder, "new.md", "a new page\n")
    added = ingest(folder, db=db)
    assert added.version["number"] == 3 and "new.md" in {f.path for f in added.included}

    (folder / "src" / "app.py").unlink()
    deleted = ingest(folder, db=db)
    assert deleted.version["number"] == 4
    paths = [f["path"] for f in registry.version_files(db, deleted.version["id"])]
    assert paths == ["README.md", "new.md"]
    assert "src/app.py" not in registry.file_catalog(db, deleted.corpus["id"])
    # Earlier versions keep their exact manifests.
    v1 = registry.get_version(db, deleted.corpus, 1)
    assert [f["path"] for f in registry.version_files(db, v1["id"])] == ["README.md", "src/app.py"]


def test_unchanged_mtime_and_size_skip_hashing(folder, db):
    ingest(folder, db=db)
    path = folder / "README.md"
    st = path.stat()
    path.write_text("# Notes\nThe harbour opens at NINE.\n")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not ingest(folder, db=db).changed  # not re-read: mtime and size are unchanged
    os.utime(path, None)
    assert ingest(folder, db=db).changed


def test_tokens_are_counted_with_the_model_tokenizer(folder, db):
    from engine.engines.tokenizer import load_tokenizer

    result = ingest(folder, db=db)
    readme = next(f for f in result.files if f.path == "README.md")
    expected = len(load_tokenizer()((folder / "README.md").read_text(), add_special_tokens=False)["input_ids"])
    assert readme.tokens == expected > 0
    assert result.version["tokens"] == sum(f.tokens for f in result.included)


def test_bad_input_writes_nothing(tmp_path, db):
    empty = tmp_path / "empty"
    empty.mkdir()
    only_binary = tmp_path / "bin"
    write(only_binary, "a.dat", b"\x00" * 10)
    a_file = write(tmp_path, "file.md", "text\n")
    for bad, message in [(tmp_path / "missing", "no such folder"), (a_file, "not a folder"),
                         (empty, "the folder is empty"), (only_binary, "no readable text files")]:
        with pytest.raises(UserError, match=message):
            ingest(bad, db=db)
    assert registry.list_corpora(db) == []
    assert db["files"].count == 0 and db["versions"].count == 0


def test_names_and_roots_are_unique(folder, tmp_path, db):
    ingest(folder, name="mine", db=db)
    other = tmp_path / "other"
    write(other, "a.md", "other text\n")
    with pytest.raises(UserError, match="already used"):
        ingest(other, name="mine", db=db)
    with pytest.raises(UserError, match="already ingested as 'mine'"):
        ingest(folder, name="different", db=db)
    twin = tmp_path / "x" / "notes"
    write(twin, "a.md", "same folder name\n")
    assert ingest(twin, db=db).corpus["name"] == "notes"
    assert ingest(tmp_path / "x" / "." / "notes", db=db).corpus["name"] == "notes"
