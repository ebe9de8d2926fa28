"""Self-study prompts: the seed prompts and how they are drawn and filled from a chunk, the teacher's system
prompt, and the filters that drop weak user messages and looping answers. Shared by every synthesis backend.
"""

from __future__ import annotations

import difflib
import random
import re
from pathlib import Path

import numpy as np

from engine.engines.decoding import loop_start
from engine.engines.models import context_system_prompt
from engine.errors import UserError

SEED_TYPES = ("structuring", "summarization", "question", "use_case", "creative", "recall")
BAD_OPENINGS = ("i'm ready", "i am ready", "sure", "certainly", "of course", "okay", "ok,", "here is", "here's",
                "as an ai", "i'd be happy", "i would be happy", "i'm glad", "i'm here to", "i am here to",
                "thank you", "absolutely", "great", "hello", "please provide", "please share")
QUOTED_TAIL = re.compile(r':\s*["\u201c](.+)["\u201d]\s*$', re.S)
LABEL = re.compile(r"^\s*[*_]*\s*(?:user(?:'s)? (?:message|question)|user|question|message)\s*[*_]*\s*:\s*[*_]*\s*", re.I)


PLACEHOLDER = re.compile(r"\{(topic|section|opening|question)\}")
# Names and figures: capitalised words or numbers, possibly joined by small words ("Room 4", "Odile Brannagh").
NAME = re.compile(r"\b(?:[A-Z][\w'’-]*|\d[\w£%:.,-]*)(?:[ \t]+(?:of|the|and|for|on|in|at|de)?[ \t]*(?:[A-Z][\w'’-]*|\d[\w£%:.,-]*))+")
SENTENCE_WORDS = ("The", "A", "An", "This", "That", "It", "If", "Each", "Every", "All", "Any", "Some", "No")
MIN_ANSWER_TOKENS = 8  # an answer cut short by a loop is dropped below this


def chunk_features(text: str) -> dict[str, list[str]]:
    """What a seed placeholder can be filled with, from a chunk's text: `section` (headings),
    `question` (headings that are questions), `topic` (names, figures and headings) and `opening`
    (the first words of a full sentence)."""
    lines = [line for line in text.splitlines() if not line.startswith("### File:")]
    headings = [re.sub(r"^#+", "", line).strip(" *#-=_") for line in lines if re.match(r"#{1,6}\s", line)]
    # Markdown headings (in code, "# ----- section" comments too): worded, and short enough to be a title.
    headings = [h for h in headings if 2 < len(h) <= 80 and re.search(r"[^\W\d_]{3,}", h)]
    body = "\n".join(line for line in lines if not line.startswith("#"))
    names = [name for name in find_names(body) if len(name) > 4 and not re.fullmatch(r"[\d\s.,:]+", name)]
    sentences = [s for s in body_sentences(text) if len(s.split()) >= 10]
    sections = [h for h in headings if not h.endswith("?")]
    return {"section": sections,
            "question": [h for h in headings if h.endswith("?")],
            "topic": list(dict.fromkeys(names)) + sections,
            "opening": [" ".join(s.lstrip("-*0123456789. ").split()[:8]) for s in sentences]}


def find_names(text: str) -> list[str]:
    """The names and figures of `text` (see NAME), without trailing punctuation or a sentence's first word."""
    names = []
    for match in NAME.finditer(text):
        words = match.group(0).rstrip(".,:;").split()
        if words[0] in SENTENCE_WORDS:  # "The Wood Shop" -> "Wood Shop"
            words = words[1:]
        names.append(" ".join(words))
    return names


def body_sentences(text: str) -> list[str]:
    """The sentences of a chunk's text outside headings and file headers (the first and last may be cut)."""
    body = " ".join(line for line in text.splitlines() if not line.startswith("#"))
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", body)]


def is_direct(seed: str) -> bool:
    """A seed with placeholders is a user message template, not a prompt for the model."""
    return PLACEHOLDER.search(seed) is not None


def fill_seed(seed: str, chunk, rng: random.Random) -> str | None:
    """The seed with each placeholder replaced by a random fitting piece of the chunk; None if it has none."""
    features = chunk_features(chunk.text)
    values = {}
    for name in set(PLACEHOLDER.findall(seed)):
        if not features[name]:
            return None
        values[name] = rng.choice(features[name])
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], seed)


def kept_answer_length(ids: list[int]) -> int | None:
    """How many answer tokens to keep: all of them, or those before a loop; None (drop the answer) when
    fewer than MIN_ANSWER_TOKENS come before the loop."""
    cut = loop_start(ids)
    if cut is None:
        return len(ids)
    return cut if cut >= MIN_ANSWER_TOKENS else None


def chunk_sources(chunk) -> tuple[list[str], list[str]]:
    """(files, their content hashes) a chunk was drawn from, recorded with each conversation."""
    files = list(getattr(chunk, "files", []) or [])
    return files, list(getattr(chunk, "file_hashes", []) or [""] * len(files))


def slot_random(seed: int, chunk, index: int) -> tuple[random.Random, np.random.Generator]:
    """The random streams of one conversation (seed draw, placeholder fill, sampled user turn), keyed by its
    chunk's slot (or its index in this call): a resumed synthesis makes the same conversations an
    uninterrupted one would, whatever was made before it."""
    slot = getattr(chunk, "slot", None) or (0, index)
    return random.Random(f"{seed}/{slot[0]}/{slot[1]}"), np.random.default_rng([seed, slot[0], slot[1]])


class SeedPrompts(dict):
    """Seed prompts per type, and optionally how often each type is drawn (`weights`; None: uniformly)."""

    weights: dict[str, float] | None = None


def parse_seed_mix(mix: str) -> dict[str, float]:
    """`"question:4,recall:2"` -> weights per seed type; types left out of a mix are not drawn."""
    weights = {}
    for part in filter(None, (p.strip() for p in mix.split(","))):
        name, _, value = part.partition(":")
        try:
            weights[name.strip()] = float(value) if value.strip() else 1.0
        except ValueError:
            raise UserError(f"bad seed mix entry {part!r}: use type:weight, e.g. question:4") from None
    if weights and (any(w < 0 for w in weights.values()) or not any(weights.values())):
        raise UserError(f"seed mix {mix!r} needs weights >= 0, at least one above 0")
    return weights


def mix_seeds(seeds: dict[str, list[str]], mix: str) -> SeedPrompts:
    """`seeds` drawn by the weights of `mix` (see `parse_seed_mix`); an empty mix draws types uniformly."""
    mixed = SeedPrompts(seeds)
    weights = parse_seed_mix(mix)
    if weights:
        unknown = set(weights) - set(seeds)
        if unknown:
            raise UserError(f"seed mix names unknown seed type(s) {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(sorted(seeds))})")
        mixed.weights = weights
    return mixed


def load_seed_prompts(assets_dir: Path) -> dict[str, list[str]]:
    """Seed prompts per type from `<assets_dir>/*.txt` (prompts separated by lines that are exactly `---`)."""
    folder = Path(assets_dir)
    if not folder.is_dir():
        raise UserError(f"seed prompts folder not found: {folder}")
    seeds: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.txt")):
        parts = re.split(r"(?m)^---[ \t]*\r?$", path.read_text(encoding="utf-8"))
        prompts = [p.strip() for p in parts if p.strip()]
        if prompts:
            seeds[path.stem] = prompts
    if not seeds:
        raise UserError(f"no seed prompts in {folder} (expected files like question.txt)")
    return seeds


def chunk_system_prompt(chunk) -> str:
    """The teacher's system prompt for a chunk: its teacher context (the whole corpus, or a window
    around the chunk) when it has one, else the chunk with a file-path header if its text has none."""
    if getattr(chunk, "context", None):
        return context_system_prompt(chunk.context)
    text = chunk.text
    files = list(getattr(chunk, "files", []) or [])
    first_line = text.lstrip().split("\n", 1)[0]
    if files and not any(f in first_line for f in files):
        text = f"### File: {files[0]}\n{text}"
    return context_system_prompt(text)


def clean_user_message(message: str) -> str:
    """Drop a leading "User:"/"Question:" label, keep only the quote of `A user might ask: "..."`,
    and drop quotes wrapping the whole message."""
    text = LABEL.sub("", message.strip(), count=1).strip()
    quoted = QUOTED_TAIL.search(text)
    if quoted and len(quoted.group(1)) > 8:
        text = quoted.group(1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def salvage_truncated(message: str) -> str | None:
    """The usable start of a user message cut off at the length cap: up to its first question mark,
    or its first paragraph if that is a complete sentence; None when nothing complete is there.

    A small model often asks its question and then keeps talking; the question alone is a fine message.
    """
    text = message.strip()
    if "?" in text:
        return text[: text.index("?") + 1].strip()
    first = text.split("\n\n", 1)[0].strip()
    if first != text and first.endswith((".", "!")) and len(first.split()) >= 5:
        return first
    return None


def is_bad_user_message(message: str, seed: str, finished: bool) -> bool:
    """Filter the weak questions a small model writes: empty, truncated, echoes, or talk about the prompt."""
    text = message.strip()
    if not finished or len(re.findall(r"[^\W\d_]{2,}", text)) < 3:
        return True
    low = text.lower().lstrip("\"'*# ")
    # Descriptions such as "The user wants to know ..." are kept: the teacher's answer to them still
    # draws on the chunk, and a small model writes many of them.
    if low.startswith(BAD_OPENINGS):
        return True
    seed_low = seed.strip().lower()
    if low in seed_low or seed_low[:60] in low:
        return True
    return difflib.SequenceMatcher(None, low, seed_low).ratio() > 0.6


def draw_seed(seeds: dict[str, list[str]], rng: random.Random, avoid: str = "") -> tuple[str, str]:
    types = sorted(seeds)
    weights = getattr(seeds, "weights", None)
    if weights:
        seed_type = rng.choices(types, [weights.get(t, 0.0) for t in types])[0]
    else:
        seed_type = rng.choice(types)
    options = [s for s in seeds[seed_type] if s != avoid] or seeds[seed_type]
    return seed_type, rng.choice(options)
