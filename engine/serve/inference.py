"""Chat with a model plus cartridges (composed when several), the corpus in context (icl), passages
retrieved for each question (rag), a cartridge plus retrieved passages (cartridge+rag), or nothing.

The prompt is always built by `chat_ids`, the format the cartridge was trained on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.store import registry
from engine.cartridge.format import compose, load_cartridge
from engine.cartridge.metadata import read_metadata
from engine.corpus.chunks import assemble, version_documents
from engine.engines.decoding import DEFAULT_DECODING, LoopGuard, stop_ids
from engine.errors import UserError
from engine.engines.models import LoadedModel, chat_ids, context_system_prompt, load_model, passages_messages

MODES = ("cartridge", "icl", "none", "rag", "cartridge+rag")
CARTRIDGE_MODES = ("cartridge", "cartridge+rag")
DEFAULT_CONTEXT = 8192  # the bundled model's positions
ICL_MARGIN = 512  # room for the question and the answer next to the corpus
RAG_MODES = ("rag", "cartridge+rag")


@dataclass
class Reply:
    answer: str
    mode: str
    cartridges: list[str]
    ttft_s: float
    tokens_per_s: float
    kv_bytes: int
    n_tokens: int
    versions: list[dict] = field(default_factory=list)  # [{"corpus", "version"}] that answered
    engine: str = "torch"
    sources: list[dict] = field(default_factory=list)  # rag modes: [{"path", "lines": [first, last]}] used

    def to_json(self) -> dict:
        return {"answer": self.answer, "mode": self.mode, "cartridges": self.cartridges, "ttft_s": self.ttft_s,
                "tokens_per_s": self.tokens_per_s, "kv_bytes": self.kv_bytes, "versions": self.versions,
                "engine": self.engine, "sources": self.sources}


@dataclass
class Target:
    """What one chat talks to: the resolved corpora versions and, in cartridge mode, their cartridges."""

    corpora: list[dict]
    versions: list[dict]
    mode: str
    cartridge_folders: list[Path]
    model_spec: str | None
    rag_tokens: int = 0  # rag modes: the retrieved passages' token budget


def resolve(db, corpus_names: list[str], *, version: int | None = None, mode: str = "cartridge",
            model: str | None = None, rag_tokens: int | None = None) -> Target:
    """Look up each corpus's version (its current one, or `version`) and, for cartridge modes, its cartridge.

    The rag budget defaults to the cartridges' p (the quick preset's p for the corpus's size without one), so
    retrieval and the cartridge hold the same KV memory."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if version is not None and len(corpus_names) > 1:
        raise UserError("--version applies to one corpus; give one corpus or leave --version out")
    corpora, versions, folders = [], [], []
    for name in corpus_names:
        corpus = registry.get_corpus(db, name)
        row = registry.get_version(db, corpus, version)
        if mode in CARTRIDGE_MODES:
            if row["status"] != "ready" or not row["cartridge"]:
                ready = [v for v in registry.list_versions(db, corpus["id"]) if v["status"] == "ready"]
                if version is None and ready:
                    row = ready[-1]
                else:
                    raise UserError(f"{name!r} v{row['number']} has no trained cartridge yet: run `cartridge train {name}`")
            folders.append(Path(row["cartridge"]))
        corpora.append(corpus)
        versions.append(row)
    if mode == "icl":
        _check_icl_fits(versions, model)
    if rag_tokens is not None and rag_tokens < 1:
        raise UserError("--rag-tokens must be at least 1")
    budget = rag_tokens or sum(_cartridge_p(v) for v in versions)
    if mode in CARTRIDGE_MODES and model is None:
        specs = set()
        for folder in folders:
            spec = read_metadata(folder).get("base_model")
            specs.add(spec if isinstance(spec, str) else None)  # a missing one: load_cartridge says so clearly
        if len(specs) > 1:
            raise UserError(f"these cartridges were trained on different models ({', '.join(map(str, specs))})")
        model = specs.pop() if specs else None
    return Target(corpora, versions, mode, folders, model, budget if mode in RAG_MODES else 0)


def default_mode(db, corpus_names: list[str], *, version: int | None = None) -> str:
    """The mode a chat starts in: the cartridge, or cartridge+rag when one of the corpora is longer than the model's
    context. Measured on two such folders with quick (README: retrieval), the cartridge alone answered 2 of 32 and 3
    of 20 questions, with retrieved passages beside it 9 and 8 at the lowest answer NLL of every mode; on folders
    that fit, the cartridge alone keeps chat free of any prefill."""
    from engine.store.library import icl_fits

    number = version if len(corpus_names) == 1 else None  # resolve() refuses a version with several corpora
    for name in corpus_names:
        row = registry.get_version(db, registry.get_corpus(db, name), number)
        if not icl_fits(int(row["tokens"] or 0)):
            return "cartridge+rag"
    return "cartridge"


def _check_icl_fits(versions: list[dict], model: str | None) -> None:
    """Refuse icl for a corpus longer than the bundled model's context before loading anything."""
    from engine.engines.tokenizer import is_default

    tokens = sum(int(v.get("tokens") or 0) for v in versions)
    if is_default(model) and tokens + ICL_MARGIN > DEFAULT_CONTEXT:
        raise UserError(f"the corpus ({tokens:,} tokens) does not fit the model's context ({DEFAULT_CONTEXT:,} "
                        "positions): chat with its cartridge, or use --mode rag")


def _cartridge_p(version: dict) -> int:
    from engine.store.library import cartridge_info
    from engine.training.distill import PRESETS

    info = cartridge_info(version.get("cartridge"))
    return int(info["p"]) if info and info["p"] else PRESETS["quick"].p_for(int(version.get("tokens") or 0))


class Chat:
    """A chat over any inference engine (`engine.engines.base`): the prompt (system prompt for icl, retrieved
    passages for rag), fit checks, streaming and timing. Cartridge modes put the (composed) cartridge in
    front once; every turn is a prompt after it."""

    def __init__(self, db, target: Target, engine, tokenizer, embeddings=None):
        self.target, self.engine, self.tokenizer = target, engine, tokenizer
        self.max_positions = engine.n_ctx
        self.system: str | None = None
        self.sources: list[dict] = []
        if target.mode == "icl":
            text = "".join(assemble(version_documents(db, v)) for v in target.versions)
            self.system = context_system_prompt(text)
        self.stop_ids = stop_ids(tokenizer)
        self.prefix_tokens = engine.set_prefix(embeddings) if embeddings is not None else 0

    @property
    def llama(self):
        """The llama.cpp worker, when the engine is llama.cpp (None otherwise)."""
        return getattr(self.engine, "llama", None)

    def retrieve(self, question: str) -> str:
        """The rag system prompt for `question` (and the passages' sources, kept for the reply)."""
        from engine.corpus.retrieval import rag_prompt

        db = registry.open_registry()
        try:
            prompt, passages = rag_prompt(db, self.target.versions, question, self.target.rag_tokens, self.tokenizer)
        finally:
            db.close()
        self.sources = [p.source() for p in passages]
        return prompt

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if self.target.mode in RAG_MODES:
            question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            messages = passages_messages(self.tokenizer, self.retrieve(question), messages,
                                         after_cartridge=self.target.mode in CARTRIDGE_MODES)
        elif self.system is not None:
            messages = [{"role": "system", "content": self.system}] + [m for m in messages if m["role"] != "system"]
        return chat_ids(self.tokenizer, messages, add_generation_prompt=True)

    def check_fits(self, n_prompt: int, max_new_tokens: int) -> None:
        needed = self.prefix_tokens + n_prompt + max_new_tokens
        if needed > self.max_positions:
            if self.system is not None:
                what, fix = "the corpus in context", "use a cartridge, or start a new chat"
            elif self.prefix_tokens:
                what, fix = (f"the cartridges ({self.prefix_tokens:,} positions) and the conversation",
                             "compose fewer corpora, ask for a shorter answer, or start a new chat")
            else:
                what, fix = "the conversation", "ask for a shorter answer, or start a new chat"
            raise UserError(f"{what} needs {needed:,} positions with the answer but the model has "
                            f"{self.max_positions:,}: {fix}")

    def reply(self, messages: list[dict], *, max_new_tokens: int = DEFAULT_DECODING.max_new_tokens,
              temperature: float = DEFAULT_DECODING.temperature, no_repeat_ngram: int = DEFAULT_DECODING.no_repeat_ngram,
              on_text: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None) -> Reply:
        """Answer the last user message of `messages`, streaming text pieces to `on_text`.

        The loop guard (`engine.engines.decoding`) keeps the answer from repeating itself: an answer that loops
        anyway ends where the repetition began (the streamed text may have shown a little more).
        """
        ids = self.prompt_ids(messages)
        self.check_fits(len(ids), max_new_tokens)
        tokenizer = self.tokenizer
        out: list[int] = []
        shown = ""
        first: list[float] = []
        start = time.perf_counter()

        class _Stop(Exception):
            pass

        def on_token(token: int) -> None:
            nonlocal shown
            if not first:
                first.append(time.perf_counter())
            out.append(token)
            text = tokenizer.decode(out, skip_special_tokens=True)
            if on_text and not text.endswith("\ufffd"):
                on_text(text[len(shown):])
                shown = text
            if should_stop and should_stop():
                raise _Stop  # unwinds the engine's call at once (in a worker process too)

        guard = LoopGuard(no_repeat_ngram)
        try:
            self.engine.generate(ids, max_new_tokens, temperature=temperature, stop_ids=self.stop_ids,
                                 on_token=on_token, guard=guard)
        except _Stop:
            pass
        end = time.perf_counter()
        n_generated = len(out)
        del out[len(guard.kept()):]
        answer = tokenizer.decode(out, skip_special_tokens=True)
        if on_text and answer != shown and answer.startswith(shown):
            on_text(answer[len(shown):])
        ttft = (first[0] - start) if first else end - start
        decode_s = end - first[0] if first else 0.0
        return Reply(
            answer=answer.strip(), mode=self.target.mode, cartridges=[str(f) for f in self.target.cartridge_folders],
            ttft_s=round(ttft, 4),
            tokens_per_s=round((n_generated - 1) / decode_s, 2) if n_generated > 1 and decode_s else 0.0,
            kv_bytes=self.engine.kv_bytes(self.prefix_tokens + len(ids)), n_tokens=len(out),
            versions=[{"corpus": c["name"], "version": v["number"], "uid": c["uid"]}
                      for c, v in zip(self.target.corpora, self.target.versions)],
            engine=self.engine.name, sources=list(self.sources),
        )


def torch_chat(db, target: Target, *, device: str | None = None, lm: LoadedModel | None = None) -> Chat:
    """A chat on transformers; the cartridge (or composed cartridges) is a fresh prefix cache per turn."""
    from engine.engines.torch_engine import TorchEngine

    lm = lm or load_model(target.model_spec, device)
    embeddings = None
    if target.mode in CARTRIDGE_MODES:
        embeddings = compose([load_cartridge(f, lm) for f in target.cartridge_folders])
    return Chat(db, target, TorchEngine(lm), lm.tokenizer, embeddings)


def llamacpp_chat(db, target: Target) -> Chat:
    """A chat on llama.cpp with the GGUF, in its worker process (a native crash ends the worker, not the app):
    the cartridge is written into the context once; each turn reuses whatever prompt prefix is evaluated."""
    from engine.engines.llamacpp import template_prefix_ids
    from engine.engines.llamacpp_inference import LlamaCppInference
    from engine.engines.llamacpp_worker import LlamaCppProcess
    from engine.engines.tokenizer import load_tokenizer
    from engine.store.paths import default_model_path

    tokenizer = load_tokenizer(None)
    llama = LlamaCppProcess(default_model_path(), n_ctx=8192 if target.mode == "icl" else 4096)
    try:
        embeddings = None
        if target.mode in CARTRIDGE_MODES:
            embeddings = compose([load_cartridge(f, llama) for f in target.cartridge_folders])
        return Chat(db, target, LlamaCppInference(llama, warm_ids=template_prefix_ids(tokenizer)), tokenizer, embeddings)
    except BaseException:
        llama.close()
        raise


ENGINES = ("llama.cpp", "torch")


def choose_engine(requested: str | None, model_spec: str | None) -> str:
    """llama.cpp for the bundled GGUF model, torch for any other model; `requested` overrides."""
    from engine.engines.tokenizer import is_default

    if requested not in (None, "auto", *ENGINES):
        raise UserError(f"unknown engine {requested!r} (choose from {', '.join(ENGINES)})")
    if requested in ENGINES:
        if requested == "llama.cpp" and not is_default(model_spec):
            raise UserError("the llama.cpp engine serves the bundled GGUF model; use --engine torch for other models")
        return requested
    return "llama.cpp" if is_default(model_spec) else "torch"


def open_chat(db, corpus_names: list[str], *, version: int | None = None, mode: str = "cartridge",
              model: str | None = None, device: str | None = None, engine: str | None = None,
              rag_tokens: int | None = None):
    """A chat backend for the given corpora and mode."""
    from engine.engines.llamacpp import LayoutUnsupported

    target = resolve(db, corpus_names, version=version, mode=mode, model=model, rag_tokens=rag_tokens)
    if choose_engine(engine, target.model_spec) == "llama.cpp" and device in (None, "auto", "cpu"):
        try:
            return llamacpp_chat(db, target)
        except LayoutUnsupported as exc:
            if engine == "llama.cpp":
                raise
            print(f"note: {exc}; using the torch engine", file=sys.stderr)
    return torch_chat(db, target, device=device)
