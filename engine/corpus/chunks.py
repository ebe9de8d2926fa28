"""A version's corpus text, assembled deterministically, and random token spans (chunks) drawn from it.

Each chunk records the files it comes from, so later work can reuse or drop data per file.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import numpy as np

from engine.store import registry
from engine.engines.tokenizer import backend_tokenizer

FILE_HEADER = "### File: {path}\n"
HEADER_TOKENS = 12  # about what "### File: PATH (continued)" costs in tokens


@dataclass
class Document:
    path: str
    sha256: str
    text: str


@dataclass
class Chunk:
    text: str
    files: list[str]
    file_hashes: list[str]
    start: int  # first token index in the corpus text
    n_tokens: int
    context: str | None = None  # what the teacher sees: the whole corpus or a window around the chunk
    context_tokens: int = 0
    slot: tuple[int, int] | None = None  # (round, index) in a synthesis's chunk list: seeds its conversation


def version_documents(db, version: dict) -> list[Document]:
    """The included files of a version, sorted by path, with their exact stored text."""
    return [Document(f["path"], f["sha256"], registry.blob_text(db, f["sha256"]))
            for f in registry.version_files(db, version["id"])]


def assemble(documents: list[Document]) -> str:
    """Corpus text: each file preceded by a header line with its relative path, in path order."""
    return "".join(FILE_HEADER.format(path=d.path) + d.text.rstrip("\n") + "\n\n"
                   for d in sorted(documents, key=lambda d: d.path))


class ChunkSampler:
    """Draws random spans of N tokens from the assembled corpus text."""

    def __init__(self, documents: list[Document], tokenizer_spec: str | None = None):
        self.documents = sorted(documents, key=lambda d: d.path)
        self.text = assemble(self.documents)
        # Each file's block (header included) is tokenized on its own and its (start char, end char) token
        # offsets kept in one int64 array: no per-token Python objects for the whole corpus.
        tokenizer = backend_tokenizer(tokenizer_spec)
        self.char_starts, self.token_starts, parts, position = [], [], [], 0
        for doc in self.documents:
            block = FILE_HEADER.format(path=doc.path) + doc.text.rstrip("\n") + "\n\n"
            offsets = np.asarray(tokenizer.encode(block, add_special_tokens=False).offsets, dtype=np.int64)
            self.char_starts.append(position)
            self.token_starts.append(sum(len(p) for p in parts))
            parts.append(offsets.reshape(-1, 2) + position)
            position += len(block)
        self.offsets = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
        self.n_tokens = len(self.offsets)
        self.token_starts.append(self.n_tokens)

    def _doc_at_char(self, char: int) -> int:
        return max(0, bisect.bisect_right(self.char_starts, char) - 1)

    def span(self, start: int, n_tokens: int) -> Chunk:
        """The chunk of tokens [start, start + n_tokens), prefixed with its file header when it starts mid-file."""
        end = min(self.n_tokens, start + n_tokens)
        first_char, last_char = int(self.offsets[start][0]), int(self.offsets[end - 1][1])
        first_doc, last_doc = self._doc_at_char(first_char), self._doc_at_char(max(first_char, last_char - 1))
        text = self.text[first_char:last_char]
        if first_char != self.char_starts[first_doc]:
            text = FILE_HEADER.format(path=self.documents[first_doc].path).rstrip("\n") + " (continued)\n" + text
        docs = self.documents[first_doc:last_doc + 1]
        return Chunk(text, [d.path for d in docs], [d.sha256 for d in docs], start, end - start)

    def sample(self, n_tokens: int, rng: random.Random, only_files: set[str] | None = None) -> Chunk:
        """A random span; with `only_files`, a span inside one of those files (clipped at its end)."""
        if only_files is None:
            start = rng.randrange(0, max(1, self.n_tokens - n_tokens + 1))
            return self.span(start, n_tokens)
        candidates = [i for i, d in enumerate(self.documents) if d.path in only_files]
        if not candidates:
            raise ValueError("none of the requested files is in this corpus")
        weights = [self.token_starts[i + 1] - self.token_starts[i] for i in candidates]
        index = rng.choices(candidates, weights=weights)[0]
        lo, hi = self.token_starts[index], self.token_starts[index + 1]
        start = rng.randrange(lo, max(lo + 1, hi - n_tokens + 1))
        return self.span(start, min(n_tokens, hi - start))

    def stratified(self, count: int, n_tokens: int, rng: random.Random,
                   only_files: set[str] | None = None) -> list[Chunk]:
        """`count` spans drawn as `sample` draws them, but stratified: the corpus (or `only_files`, end to end,
        each as long as its tokens, as `sample` weighs them) is cut into `count` equal strata and each span
        starts at a random place of its own, so every part of the text is drawn about equally often.
        Independent random starts leave some passages undrawn and draw others many times."""
        paths = None if only_files is None else {d.path for d in self.documents} & set(only_files)
        if paths is not None and not paths:
            raise ValueError("none of the requested files is in this corpus")
        ranges = []  # (first token, end token, share of the strata, number of starts)
        if paths is None:
            starts = max(1, self.n_tokens - n_tokens + 1)
            ranges.append((0, self.n_tokens, starts, starts))
        else:
            for i, doc in enumerate(self.documents):
                if doc.path in paths:
                    lo, hi = self.token_starts[i], self.token_starts[i + 1]
                    ranges.append((lo, hi, hi - lo, max(1, hi - lo - n_tokens + 1)))
        ends = np.cumsum([share for _, _, share, _ in ranges])
        total = int(ends[-1])
        spans = []
        for i in range(count):
            x = min(total - 1, int((i + rng.random()) * total / count))
            r = int(np.searchsorted(ends, x, side="right"))
            lo, hi, share, starts = ranges[r]
            start = lo + (x - (int(ends[r]) - share)) * starts // share
            spans.append(self.span(start, min(n_tokens, hi - start)))
        return spans

    def sample_many(self, count: int, n_tokens: int, seed: int = 0, only_files: set[str] | None = None,
                    cover: bool = False) -> list[Chunk]:
        """`count` random spans; with `cover`, the first ones are one per file (in a seeded order), so that
        every file is studied when `count` allows, however small it is next to the others."""
        rng = random.Random(seed)
        chunks = []
        if cover:
            files = [d.path for d in self.documents if only_files is None or d.path in only_files]
            rng.shuffle(files)
            chunks = [self.sample(n_tokens, rng, {path}) for path in files[:count]]
        return chunks + [self.sample(n_tokens, rng, only_files) for _ in range(count - len(chunks))]

    def teacher_windows(self, budget: int) -> list[tuple[int, int]]:
        """Token ranges the teacher may see: the whole corpus when it fits `budget`, else windows of
        `budget` tokens overlapping by half (so every chunk of up to budget/2 tokens lies inside one)."""
        if self.n_tokens <= budget:
            return [(0, self.n_tokens)]
        stride = max(1, budget // 2)
        starts = list(range(0, self.n_tokens - budget, stride)) + [self.n_tokens - budget]
        return [(s, s + budget) for s in dict.fromkeys(starts)]

    def with_teacher_context(self, chunks: list[Chunk], budget: int) -> list[Chunk]:
        """The chunks, each given the window (or whole corpus) the teacher answers from, ordered by window.

        Consecutive chunks of one window share the teacher's prompt, so an engine that keeps the common
        prefix of consecutive prompts evaluates each window once, not once per conversation.
        """
        windows = self.teacher_windows(budget)
        contexts: dict[int, Chunk] = {}
        placed = []
        for chunk in chunks:
            middle = chunk.start + chunk.n_tokens / 2
            index = min(range(len(windows)), key=lambda i: abs((windows[i][0] + windows[i][1]) / 2 - middle))
            if index not in contexts:
                lo, hi = windows[index]
                window = self.span(lo, hi - lo)
                if (lo, hi) == (0, self.n_tokens):
                    window.text = self.text
                contexts[index] = window
            window = contexts[index]
            # The answer may draw on anything the teacher saw: the conversation depends on all its files.
            chunk.context, chunk.context_tokens = window.text, window.n_tokens
            chunk.files, chunk.file_hashes = list(window.files), list(window.file_hashes)
            placed.append((index, chunk))
        return [chunk for _, chunk in sorted(placed, key=lambda pair: pair[0])]

    def spread(self, n_tokens: int, pieces: int = 8) -> str:
        """About `n_tokens` tokens of text in `pieces` evenly spaced excerpts from across the corpus (each
        excerpt's file header line included)."""
        if self.n_tokens <= n_tokens:
            return self.text
        pieces = max(2, min(pieces, n_tokens // (HEADER_TOKENS + 16)))  # at least 16 tokens of text each
        size = max(1, n_tokens // pieces - HEADER_TOKENS)
        starts = [round(i * (self.n_tokens - size) / max(1, pieces - 1)) for i in range(pieces)]
        return "\n\n".join(self.span(s, size).text for s in starts)

    def prefix(self, n_tokens: int) -> str:
        """The text of the first `n_tokens` tokens (used to initialise a cartridge)."""
        end = min(self.n_tokens, n_tokens)
        return self.text[: int(self.offsets[end - 1][1])] if end else ""
