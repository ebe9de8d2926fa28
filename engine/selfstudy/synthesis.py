"""Self-study: the model writes the training conversations for its own cartridge.

For each corpus chunk: (1) given the chunk in its system prompt and a seed prompt, the model samples a
message a user might send (a seed with placeholders such as `{topic}` is instead the message itself,
filled from the chunk: small models write poor questions but answer well-posed ones); (2) given the
chunk and that message, it answers greedily, and the teacher's top-k log-probabilities at every answer
position are kept for distillation. Both turns share the
chunk's system-prompt KV (prefilled once per chunk), and several chunks run as one left-padded batch.

Backends share one signature; `BACKENDS` maps a name to an implementation ("torch" lives here, others
may register themselves, e.g. a llama.cpp one).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from engine.selfstudy.conversations import Conversation
from engine.engines.decoding import loop_start, stop_ids
from engine.errors import UserError
from engine.engines.models import LoadedModel, chat_ids, context_system_prompt

log = logging.getLogger(__name__)

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
    names = []
    for match in NAME.finditer(body):
        words = match.group(0).rstrip(".,:;").split()
        if words[0] in SENTENCE_WORDS:  # "The Wood Shop" -> "Wood Shop"
            words = words[1:]
        name = " ".join(words)
        if len(name) > 4 and not re.fullmatch(r"[\d\s.,:]+", name):
            names.append(name)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", body) if len(s.split()) >= 10]
    sections = [h for h in headings if not h.endswith("?")]
    return {"section": sections,
            "question": [h for h in headings if h.endswith("?")],
            "topic": list(dict.fromkeys(names)) + sections,
            "opening": [" ".join(s.lstrip("-*0123456789. ").split()[:8]) for s in sentences]}


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


# ----------------------------------------------------------------------------- batched decoding


@dataclass
class _Decoded:
    ids: list[int]
    finished: bool  # stopped on a stop token (included in ids when keep_stop)
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None


def _fork(cache, rows: list[int] | None = None):
    """A new DynamicCache over the same prefix tensors (the model appends by concatenation, so the
    source is never modified), optionally keeping only some batch rows."""
    from transformers import DynamicCache

    layers = []
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        if rows is not None:
            index = torch.tensor(rows, device=keys.device)
            keys, values = keys.index_select(0, index), values.index_select(0, index)
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers)


class _PrefixCache:
    """Prefills a batch's system prompts, each distinct prompt once, and keeps the last batch's result:
    with a corpus-wide teacher every job shares one long prompt, prefilled once for many batches."""

    def __init__(self, lm: LoadedModel, pad_id: int):
        self.lm, self.pad_id = lm, pad_id
        self.key, self.cache, self.mask = None, None, None

    def rows(self, prefixes: list[list[int]]):
        """(cache, mask, row per job): cache rows are the distinct prefixes, never modified by decoding."""
        distinct = list(dict.fromkeys(tuple(p) for p in prefixes))
        if distinct != self.key:
            self.cache = self.mask = None  # free the old prefill before making the next one
            self.cache, self.mask = _prefill(self.lm, [list(p) for p in distinct], self.pad_id)
            self.key = distinct
        index = {p: i for i, p in enumerate(distinct)}
        return self.cache, self.mask, [index[tuple(p)] for p in prefixes]


@torch.no_grad()
def _prefill(lm: LoadedModel, prefixes: list[list[int]], pad_id: int):
    """Left-padded prefill of the shared system prompts; returns (cache, mask).

    Many tokens per call: here bf16 autocast pays off (~1.8x on an AVX512-BF16 CPU).
    """
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for row, p in enumerate(prefixes):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with lm.autocast():
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.cache, mask


@torch.no_grad()
def _decode(
    lm: LoadedModel,
    cache,
    prefix_mask: torch.Tensor,
    suffixes: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float,
    k: int,
    stop: set[int],
    pad_id: int,
    generator: torch.Generator | None,
) -> list[_Decoded]:
    """Feed each row's suffix after its prefix, then decode. Suffixes are left-padded so all rows end in
    the same column; positions come from the attention mask, so padding never shifts a row.

    With k > 0, the top-k log-probs of every decoded position are taken from the logits that chose the
    token (no second forward pass).
    """
    batch = len(suffixes)
    width = max(len(s) for s in suffixes)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, s in enumerate(suffixes):
        ids[row, width - len(s):] = torch.tensor(s)
        mask[row, width - len(s):] = 1
    ids, mask = ids.to(lm.device), torch.cat([prefix_mask, mask.to(lm.device)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]

    out_ids = [[] for _ in range(batch)]
    out_topk = [[] for _ in range(batch)]
    out_lp = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(max_new_tokens):
        # No autocast here: it re-casts every weight matrix at each call, which costs more than it saves
        # when a step processes one token per row (measured ~1.4x slower on CPU).
        result = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                          use_cache=True, logits_to_keep=1)
        cache = result.cache
        logits = result.logits[:, -1].float()
        if k:
            top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            top_ids, top_lp = top.indices.cpu().numpy(), top.values.cpu().numpy()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            # Greedy = the teacher's top-1 (argmax and topk may break bf16 ties differently).
            chosen = top.indices[:, 0] if k else logits.argmax(-1)
        chosen_list = chosen.tolist()
        for row in range(batch):
            if done[row]:
                continue
            token = chosen_list[row]
            out_ids[row].append(token)
            if k:
                out_topk[row].append(top_ids[row])
                out_lp[row].append(top_lp[row])
            if token in stop:
                done[row] = True
        if all(done):
            break
        # Finished rows keep feeding their last token, masked out, so the batch stays rectangular.
        ids = torch.tensor([[row[-1]] for row in out_ids], device=lm.device)
        step_mask = torch.tensor([[0 if d else 1] for d in done], device=lm.device, dtype=mask.dtype)
        mask = torch.cat([mask, step_mask], dim=1)
        positions = positions[:, -1:] + 1
    results = []
    for row in range(batch):
        finished = bool(out_ids[row]) and out_ids[row][-1] in stop
        topk_ids = np.stack(out_topk[row]).astype(np.int32) if k and out_topk[row] else np.zeros((0, k), np.int32)
        topk_lp = np.stack(out_lp[row]).astype(np.float16) if k and out_lp[row] else np.zeros((0, k), np.float16)
        results.append(_Decoded(out_ids[row], finished, topk_ids, topk_lp))
    return results


# ----------------------------------------------------------------------------- torch backend


@dataclass
class _Job:
    chunk: object
    prefix: list[int]  # the chunk's system-prompt ids, shared by both turns
    seed_type: str = ""
    seed: str = ""
    user: str = ""
    rng: random.Random | None = None  # this conversation's own stream (see slot_random)


def _suffix(lm: LoadedModel, job: _Job, user_content: str) -> list[int] | None:
    system = chunk_system_prompt(job.chunk)
    full = chat_ids(lm.tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": user_content}],
                    add_generation_prompt=True)
    if full[: len(job.prefix)] != job.prefix:
        return None  # the template does not render the system turn as a prefix: cannot share its KV
    return full[len(job.prefix):]


def draw_seed(seeds: dict[str, list[str]], rng: random.Random, avoid: str = "") -> tuple[str, str]:
    types = sorted(seeds)
    weights = getattr(seeds, "weights", None)
    if weights:
        seed_type = rng.choices(types, [weights.get(t, 0.0) for t in types])[0]
    else:
        seed_type = rng.choice(types)
    options = [s for s in seeds[seed_type] if s != avoid] or seeds[seed_type]
    return seed_type, rng.choice(options)


def _synthesize_torch(lm: LoadedModel, chunks: Iterable, n: int, *, seeds, k, temperature, max_user_tokens,
                      max_answer_tokens, batch_size, on_progress, seed) -> Iterator[Conversation]:
    generator = torch.Generator(device=lm.device).manual_seed(seed)  # batched sampling: one stream per call
    tok = lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = stop_ids(tok)
    produced = 0
    chunk_iter = enumerate(chunks)
    exhausted = False
    prefixes = _PrefixCache(lm, pad_id)
    while produced < n and not exhausted:
        jobs: list[_Job] = []
        while len(jobs) < min(batch_size, n - produced):
            try:
                index, chunk = next(chunk_iter)
            except StopIteration:
                exhausted = True
                break
            prefix = chat_ids(tok, [{"role": "system", "content": chunk_system_prompt(chunk)}], add_generation_prompt=False)
            jobs.append(_Job(chunk, prefix, rng=slot_random(seed, chunk, index)[0]))
        if not jobs:
            break
        cache, prefix_mask, row_of = prefixes.rows([j.prefix for j in jobs])

        # Turn 1: a user message per chunk, sampled; a rejected one is retried once with another seed.
        pending = list(range(len(jobs)))
        for attempt in range(2):
            if not pending:
                break
            suffixes, asking, still = [], [], []
            for i in pending:
                jobs[i].seed_type, jobs[i].seed = draw_seed(seeds, jobs[i].rng, avoid=jobs[i].seed)
                if is_direct(jobs[i].seed):
                    jobs[i].user = fill_seed(jobs[i].seed, jobs[i].chunk, jobs[i].rng) or ""
                    if not jobs[i].user:
                        still.append(i)
                    continue
                asking.append(i)
                suffixes.append(_suffix(lm, jobs[i], jobs[i].seed) or [])
            if any(not s for s in suffixes):
                raise UserError("this model's chat template does not render the system turn as a prefix of the "
                                "conversation, which self-study relies on; use another model")
            rows = [row_of[i] for i in asking]
            decoded = _decode(lm, _fork(cache, rows), prefix_mask[rows], suffixes, max_user_tokens,
                              temperature=temperature, k=0, stop=stop, pad_id=pad_id,
                              generator=generator) if asking else []
            for i, d in zip(asking, decoded):
                ids = [t for t in d.ids if t not in stop]
                message, finished = clean_user_message(tok.decode(ids, skip_special_tokens=True)), d.finished
                if not finished and (cut := salvage_truncated(message)) is not None:
                    message, finished = clean_user_message(cut), True
                if is_bad_user_message(message, jobs[i].seed, finished):
                    log.debug("rejected user message (%s, finished=%s): %r", jobs[i].seed_type, d.finished, message)
                    still.append(i)
                else:
                    jobs[i].user = message
            pending = still
        suffix_of = {i: _suffix(lm, j, j.user) for i, j in enumerate(jobs) if j.user}
        good = [i for i, suffix in suffix_of.items() if suffix]
        if not good:
            continue

        # Turn 2: the greedy answer with the teacher's top-k, from the same prefix KV.
        suffixes = [suffix_of[i] for i in good]
        rows = [row_of[i] for i in good]
        decoded = _decode(lm, _fork(cache, rows), prefix_mask[rows], suffixes, max_answer_tokens,
                          temperature=0.0, k=k, stop=stop, pad_id=pad_id, generator=generator)
        del cache
        for i, d in zip(good, decoded):
            keep = kept_answer_length(d.ids)
            if keep is None:
                continue
            answer, topk_ids, topk_lp = d.ids[:keep], d.topk_ids[:keep], d.topk_logprobs[:keep]
            if not [t for t in answer if t not in stop] or produced >= n:
                continue
            files, hashes = chunk_sources(jobs[i].chunk)
            yield Conversation(user=jobs[i].user, answer_ids=answer, topk_ids=topk_ids, topk_logprobs=topk_lp,
                               files=files, file_hashes=hashes, seed_type=jobs[i].seed_type,
                               slot=getattr(jobs[i].chunk, "slot", None))
            produced += 1
            if on_progress is not None:
                on_progress(produced, n)


BACKENDS: dict[str, Callable[..., Iterator[Conversation]]] = {"torch": _synthesize_torch}


def _register_llamacpp() -> None:
    """Pick up `engine.selfstudy.synthesis_llamacpp.llamacpp_backend` (same signature as the torch backend) when it
    can be imported."""
    if "llamacpp" in BACKENDS:
        return
    try:
        from engine.selfstudy.synthesis_llamacpp import llamacpp_backend
    except Exception:  # llama-cpp-python missing or broken: the torch backend remains
        return
    BACKENDS["llamacpp"] = llamacpp_backend


def synthesis_backend(lm: LoadedModel, backend: str = "auto") -> str:
    """The backend `synthesize` runs for `backend`: "auto" takes llama.cpp for the default model on a CPU."""
    name = backend
    if backend in ("auto", "llamacpp"):
        _register_llamacpp()
    if backend == "auto":
        # llama.cpp runs the quantised GGUF itself: worth it for the default model on a CPU.
        use_llamacpp = ("llamacpp" in BACKENDS and lm.device.type == "cpu" and lm.spec == "default"
                        and importlib.util.find_spec("llama_cpp") is not None)
        name = "llamacpp" if use_llamacpp else "torch"
    if name not in BACKENDS:
        raise UserError(f"unknown synthesis backend {backend!r}: use one of auto, {', '.join(sorted(BACKENDS))}")
    return name


def synthesize(
    lm: LoadedModel,
    chunks: Iterable,
    n: int,
    *,
    seeds: dict[str, list[str]],
    k: int = 20,
    temperature: float = 0.6,
    max_user_tokens: int = 96,
    max_answer_tokens: int = 192,
    batch_size: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
    backend: str = "torch",
) -> Iterator[Conversation]:
    """Yield up to `n` self-study conversations drawn from `chunks` (one chunk per attempt; chunks whose
    user turn fails the filter twice are skipped, so pass more chunks than `n` to be sure of getting n).

    Answers keep their final stop token (with its top-k): the cartridge must also learn when to stop.
    """
    if not seeds:
        raise UserError("no seed prompts")
    if batch_size is None:
        # On CPU, decoding is bound by memory traffic (weights + the growing KV cache): beyond ~8 rows
        # the cache copies cost more than the batching saves. A GPU takes far more rows.
        batch_size = 8 if lm.device.type == "cpu" else 32
    name = synthesis_backend(lm, backend)
    return BACKENDS[name](lm, chunks, n, seeds=seeds, k=k, temperature=temperature, max_user_tokens=max_user_tokens,
                          max_answer_tokens=max_answer_tokens, batch_size=batch_size, on_progress=on_progress,
                          seed=seed)
