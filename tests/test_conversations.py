"""Conversation shards: exact roundtrip, ordering, atomicity and corruption handling."""

from __future__ import annotations

import numpy as np
import pytest

from engine.selfstudy.conversations import Conversation, count_conversations, read_conversations, shard_paths, write_shard
from engine.errors import UserError


def _conv(rng, n, k=20, user="What is in the handbook?", seed_type="question"):
    logits = rng.normal(size=(n, k)).astype(np.float32)
    return Conversation(
        user=user,
        answer_ids=rng.integers(0, 49152, size=n),
        topk_ids=rng.integers(0, 49152, size=(n, k)),
        topk_logprobs=np.sort(-np.abs(logits), axis=1)[:, ::-1],
        files=["docs/handbook.md", "faq.md"],
        file_hashes=["a" * 64, "b" * 64],
        seed_type=seed_type,
    )


def _same(a: Conversation, b: Conversation):
    assert a.user == b.user and a.files == b.files and a.file_hashes == b.file_hashes and a.seed_type == b.seed_type
    assert a.answer_ids.dtype == b.answer_ids.dtype == np.int32 and np.array_equal(a.answer_ids, b.answer_ids)
    assert b.topk_ids.dtype == np.int32 and np.array_equal(a.topk_ids, b.topk_ids)
    assert b.topk_logprobs.dtype == np.float16 and np.array_equal(a.topk_logprobs, b.topk_logprobs)


def test_roundtrip_exact_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    first = [_conv(rng, 5), _conv(rng, 0, user="empty answer ☃ ünïcode"), _conv(rng, 17, seed_type="creative")]
    second = [_conv(rng, 3, user='quotes " and \n newlines')]
    p0 = write_shard(tmp_path, first)
    p1 = write_shard(tmp_path, second)
    assert [p.name for p in shard_paths(tmp_path)] == [p0.name, p1.name] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    got = read_conversations(tmp_path)
    assert len(got) == 4 == count_conversations(tmp_path)
    for a, b in zip(first + second, got):
        _same(a, b)


def test_float16_storage_is_compact(tmp_path):
    rng = np.random.default_rng(1)
    path = write_shard(tmp_path, [_conv(rng, 100)])
    # 100 positions x 20 x (4 + 2) bytes plus ids and a small header.
    assert path.stat().st_size < 100 * 20 * 6 + 100 * 4 + 2000


def test_missing_folder_is_empty(tmp_path):
    assert read_conversations(tmp_path / "nope") == []
    assert count_conversations(tmp_path / "nope") == 0


def test_temp_files_are_ignored(tmp_path):
    rng = np.random.default_rng(2)
    write_shard(tmp_path, [_conv(rng, 4)])
    (tmp_path / ".shard-abc.tmp").write_bytes(b"half written")
    assert len(read_conversations(tmp_path)) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_shard_names_the_file(tmp_path, damage):
    rng = np.random.default_rng(3)
    path = write_shard(tmp_path, [_conv(rng, 4)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(UserError, match="shard-00000.safetensors"):
        read_conversations(tmp_path)


def test_mismatched_topk_shapes_rejected():
    with pytest.raises(ValueError):
        Conversation(user="u", answer_ids=[1, 2], topk_ids=np.zeros((2, 3)), topk_logprobs=np.zeros((2, 4)))
