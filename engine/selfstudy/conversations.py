"""Self-study conversations on disk: compact binary shards, not JSON floats.

A corpus version's conversations live in one folder as `shard-00000.safetensors`, `shard-00001...`.
Each shard holds flat concatenated arrays (answer ids, teacher top-k ids and log-probs) plus offsets;
the per-conversation text and metadata ride in the safetensors header as one JSON string. A killed
synthesis keeps every shard it finished, and a reader never sees a half-written one (temp file + rename).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import UserError

SHARD_FORMAT = "cartridge-desktop/conversations/1"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.safetensors$")


@dataclass
class Conversation:
    user: str
    answer_ids: np.ndarray  # int32 [n]
    topk_ids: np.ndarray  # int32 [n, k], the teacher's top-k token ids at each answer position
    topk_logprobs: np.ndarray  # float16 [n, k], their log-probabilities (log_softmax over the full vocab)
    files: list[str] = field(default_factory=list)  # corpus-relative paths of the chunk's files
    file_hashes: list[str] = field(default_factory=list)  # sha256 per file, same order
    seed_type: str = ""
    # (round, index) of the chunk it was made from in its version's synthesis; None when carried over from
    # an earlier version. A resumed synthesis continues after the last saved slot.
    slot: tuple[int, int] | None = None
    # Training only, never stored: a system prompt put before the user turn in the student's prompt (the
    # passages chat's cartridge+rag mode would retrieve for the question; see TrainConfig.rag).
    context: str = ""

    def __post_init__(self):
        self.answer_ids = np.asarray(self.answer_ids, dtype=np.int32).reshape(-1)
        n = self.answer_ids.shape[0]
        self.topk_ids = _as_rows(self.topk_ids, np.int32, n)
        self.topk_logprobs = _as_rows(self.topk_logprobs, np.float16, n)
        if self.topk_ids.shape != self.topk_logprobs.shape:
            raise ValueError("topk_ids and topk_logprobs must have the same shape")

    @property
    def n_tokens(self) -> int:
        return int(self.answer_ids.shape[0])


def _as_rows(values, dtype, n: int) -> np.ndarray:
    array = np.asarray(values, dtype=dtype)
    if array.ndim == 2 and array.shape[0] == n:
        return array
    return array.reshape(n, -1) if n else array.reshape(0, 0)


def shard_paths(folder: Path) -> list[Path]:
    """Finished shards of a folder, in order (temp files from an interrupted write are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := SHARD_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def write_shard(folder: Path, conversations: list[Conversation]) -> Path:
    """Write conversations as the next shard of `folder`, atomically; returns the shard's path."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = shard_paths(folder)
    index = int(SHARD_PATTERN.match(existing[-1].name).group(1)) + 1 if existing else 0
    path = folder / f"shard-{index:05d}.safetensors"

    k = conversations[0].topk_ids.shape[1] if conversations else 0
    if any(c.topk_ids.shape[1] != k for c in conversations):
        raise ValueError("all conversations of a shard must store the same top-k")
    lengths = [c.n_tokens for c in conversations]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    tensors = {
        "offsets": offsets,
        "answer_ids": np.concatenate([c.answer_ids for c in conversations]) if conversations else np.zeros(0, np.int32),
        "topk_ids": np.concatenate([c.topk_ids for c in conversations]) if conversations else np.zeros((0, k), np.int32),
        "topk_logprobs": (
            np.concatenate([c.topk_logprobs for c in conversations]) if conversations else np.zeros((0, k), np.float16)
        ),
    }
    records = [
        {"user": c.user, "files": list(c.files), "file_hashes": list(c.file_hashes), "seed_type": c.seed_type,
         "slot": list(c.slot) if c.slot is not None else None}
        for c in conversations
    ]
    metadata = {"format": SHARD_FORMAT, "k": str(k), "conversations": json.dumps(records, ensure_ascii=False)}

    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".shard-", suffix=".tmp")
    os.close(fd)
    try:
        save_file({name: np.ascontiguousarray(a) for name, a in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_shard(path: Path) -> list[Conversation]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != SHARD_FORMAT:
                raise ValueError("no conversations format tag")
            arrays = {name: fh.get_tensor(name) for name in ("offsets", "answer_ids", "topk_ids", "topk_logprobs")}
        records = json.loads(meta["conversations"])
        offsets = arrays["offsets"]
        if len(offsets) != len(records) + 1 or int(offsets[-1]) != len(arrays["answer_ids"]):
            raise ValueError("offsets do not match the stored arrays")
        if arrays["topk_ids"].shape[0] != len(arrays["answer_ids"]) or arrays["topk_ids"].shape != arrays["topk_logprobs"].shape:
            raise ValueError("top-k arrays do not match the answer ids")
    except Exception as exc:  # safetensors, json and our own checks all mean the same thing to the user
        raise UserError(f"corrupt conversations shard {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    out = []
    for i, rec in enumerate(records):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        out.append(
            Conversation(
                user=rec["user"],
                answer_ids=arrays["answer_ids"][lo:hi],
                topk_ids=arrays["topk_ids"][lo:hi],
                topk_logprobs=arrays["topk_logprobs"][lo:hi],
                files=rec.get("files", []),
                file_hashes=rec.get("file_hashes", []),
                seed_type=rec.get("seed_type", ""),
                slot=tuple(rec["slot"]) if rec.get("slot") else None,
            )
        )
    return out


def read_conversations(folder: Path) -> list[Conversation]:
    """All conversations of a folder, shard by shard; a corrupt shard raises UserError naming it."""
    out: list[Conversation] = []
    for path in shard_paths(folder):
        out.extend(_read_shard(path))
    return out


def conversation_slots(folder: Path) -> list[tuple[int, int] | None]:
    """The slot of each conversation of a folder, in order, reading only the shard headers."""
    from safetensors import safe_open

    slots = []
    for path in shard_paths(folder):
        try:
            with safe_open(str(path), framework="numpy") as fh:
                records = json.loads((fh.metadata() or {})["conversations"])
        except Exception:
            raise UserError(f"corrupt conversations shard {path}") from None
        slots.extend(tuple(r["slot"]) if r.get("slot") else None for r in records)
    return slots


def count_conversations(folder: Path) -> int:
    """How many conversations a folder holds, reading only the shard headers."""
    return len(conversation_slots(folder))
