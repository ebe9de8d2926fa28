"""Corpus text assembly and the chunk sampler."""

from conftest import write
from engine.corpus.chunks import ChunkSampler, assemble, version_documents
from engine.corpus.ingest import ingest


def make_corpus(tmp_path, db):
    root = tmp_path / "c"
    write(root, "b.md", "Bravo section. " * 60)
    write(root, "a.md", "Alpha section. " * 60)
    write(root, "sub/c.md", "Charlie section. " * 60)
    result = ingest(root, db=db)
    return version_documents(db, result.version)


def test_assembly_is_deterministic_with_path_headers(tmp_path, db):
    docs = make_corpus(tmp_path, db)
    text = assemble(docs)
    assert text == assemble(list(reversed(docs)))
    assert text.index("### File: a.md\n") < text.index("### File: b.md\n") < text.index("### File: sub/c.md\n")
    assert text.startswith("### File: a.md\nAlpha section.")


def test_chunks_record_their_files(tmp_path, db):
    sampler = ChunkSampler(make_corpus(tmp_path, db))
    chunks = sampler.sample_many(50, 40, seed=1)
    assert chunks == sampler.sample_many(50, 40, seed=1)  # seeded
    for chunk in chunks:
        assert chunk.n_tokens == 40
        for path in chunk.files:
            assert path in {"a.md", "b.md", "sub/c.md"}
        words = {"Alpha": "a.md", "Bravo": "b.md", "Charlie": "sub/c.md"}
        for word, path in words.items():
            if word in chunk.text:
                assert path in chunk.files
    spanning = sampler.span(sampler.token_starts[1] - 5, 20)
    assert spanning.files == ["a.md", "b.md"]
    assert spanning.text.startswith("### File: a.md (continued)\n")


def test_sampling_restricted_to_some_files(tmp_path, db):
    sampler = ChunkSampler(make_corpus(tmp_path, db))
    for chunk in sampler.sample_many(30, 64, seed=2, only_files={"sub/c.md"}):
        assert chunk.files == ["sub/c.md"]
        assert "Alpha" not in chunk.text and "Bravo" not in chunk.text


def test_prefix_is_the_first_tokens(tmp_path, db):
    sampler = ChunkSampler(make_corpus(tmp_path, db))
    assert sampler.prefix(5).startswith("### File")
    assert len(sampler.prefix(10)) < len(sampler.prefix(50)) < len(sampler.text)
