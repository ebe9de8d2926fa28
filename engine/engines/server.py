"""An inference server as the self-study teacher: llama.cpp's `llama-server`, vLLM or SGLang.

Each is asked for the same thing the local engines give: from already templated prompt token ids, the
generated token ids and, at every generated position, the top-k log-probabilities with their token ids.

- llama.cpp (`llama-server`): `POST /completion` with `prompt` as ids, `n_probs`, `return_tokens`.
- vLLM: `POST /v1/completions` with `prompt` as ids, `logprobs`, `return_tokens_as_token_ids` (start the
  server with `--max-logprobs 20` or more).
- SGLang: its native `POST /generate` with `input_ids`, `return_logprob`, `top_logprobs_num`.

The kind is found from what the server answers (`/props` is llama.cpp's, `/get_model_info` SGLang's,
anything else speaking `/v1/models` is taken for vLLM). Before any work the client checks that the served
tokenizer is the training model's: the teacher's top-k ids index the training model's vocabulary, so a
different tokenizer would train the cartridge on the wrong tokens. Requests time out (120 s by default: one
request is one turn of a conversation) and are retried a few times with backoff; a server that keeps
failing, or answers in a form this client cannot read, stops the run with one clear message.
"""

from __future__ import annotations

import time

import numpy as np

from engine.engines.decoding import Generated
from engine.errors import UserError

KINDS = ("llama.cpp", "vllm", "sglang")
PROBE_TEXT = "Cartridges: 3 files, 1,024 tokens — café naïve 東京 def f(x): return x**2\n\tTODO"
# Sampling left to temperature alone (no repetition penalties, top-k/top-p/min-p cuts), so a greedy answer
# and its log-probabilities are the model's own, as with the local engines.
LLAMA_PLAIN_SAMPLING = {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                        "dry_multiplier": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
                        "xtc_probability": 0.0}


DEFAULT_TIMEOUT_S = 120.0


class ServerError(UserError):
    """The server could not be reached, or answered something this client cannot use."""


class ServerClient:
    """One inference server; thread-safe (one HTTP connection pool shared by the workers)."""

    def __init__(self, url: str, *, model: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, retries: int = 2,
                 kind: str | None = None):
        import httpx

        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.retries = retries
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0),
                                  limits=httpx.Limits(max_connections=64))
        self.kind = kind or self._detect()
        if self.kind not in KINDS:
            raise ServerError(f"unknown server kind {self.kind!r} (one of {', '.join(KINDS)})")
        self._complete = {"llama.cpp": self._llama, "vllm": self._vllm, "sglang": self._sglang}[self.kind]
        self.model = model or self._served_model()

    # ------------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, body: dict | None = None, *, retry: bool = True) -> dict:
        import httpx

        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                response = self._http.request(method, self.url + path, json=body)
                if response.status_code >= 500 and attempt + 1 < attempts:
                    raise httpx.HTTPStatusError("server error", request=response.request, response=response)
                if response.status_code >= 400:
                    raise ServerError(f"{self.url}{path} answered {response.status_code}: {response.text[:300]}")
                doc = response.json()
                if not isinstance(doc, dict):
                    raise ServerError(f"{self.url}{path} answered {type(doc).__name__} JSON, not an object")
                return doc
            except ServerError:
                raise
            except (httpx.HTTPError, ValueError) as exc:
                if attempt + 1 >= attempts:
                    raise ServerError(f"the inference server at {self.url} did not answer {path} "
                                      f"({type(exc).__name__}: {exc}) after {attempts} tries") from None
                time.sleep(min(8.0, 0.5 * 2 ** attempt))
        raise AssertionError("unreachable")

    def _answers(self, path: str) -> dict | None:
        """GET `path` once; None when the server does not have it."""
        try:
            return self._request("GET", path, retry=False)
        except ServerError as exc:
            if "did not answer" in str(exc) and path == "/v1/models":
                raise
            return None

    def _detect(self) -> str:
        props = self._answers("/props")
        if props is not None and ("default_generation_settings" in props or "model_path" in props):
            return "llama.cpp"
        if self._answers("/get_model_info") is not None:
            return "sglang"
        if self._answers("/v1/models") is not None:
            return "vllm"
        raise ServerError(f"no inference server answers at {self.url} (tried llama.cpp's /props, SGLang's "
                          "/get_model_info and the OpenAI /v1/models)")

    def _served_model(self) -> str:
        if self.kind == "sglang":
            return str((self._answers("/get_model_info") or {}).get("model_path", ""))
        models = (self._answers("/v1/models") or {}).get("data") or []
        if not models:
            return ""
        if len(models) > 1:
            raise ServerError(f"{self.url} serves several models ({', '.join(m.get('id', '?') for m in models)}): "
                              "choose one with --server-model")
        return str(models[0].get("id", ""))

    def close(self) -> None:
        self._http.close()

    def describe(self) -> dict:
        return {"url": self.url, "kind": self.kind, "model": self.model}

    # ------------------------------------------------------------------ tokenizer check

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a server whose tokenizer is not `tokenizer` (compared on a probe text and the vocabulary)."""
        mine = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
        if self.kind == "llama.cpp":
            theirs = self._request("POST", "/tokenize", {"content": PROBE_TEXT, "add_special": False}).get("tokens")
        elif self.kind == "vllm":
            theirs = self._request("POST", "/tokenize", {"model": self.model, "prompt": PROBE_TEXT,
                                                         "add_special_tokens": False}).get("tokens")
        else:  # SGLang: how the server writes each of our probe ids must match our tokenizer's pieces
            out = self._request("POST", "/generate", {
                "input_ids": mine, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                "return_logprob": True, "logprob_start_len": 0, "return_text_in_logprobs": True})
            rows = (out.get("meta_info") or {}).get("input_token_logprobs") or []
            theirs = [int(row[1]) for row in rows]
            texts = [row[2] for row in rows]
            if theirs == mine and texts != [tokenizer.decode([i]) for i in mine]:
                theirs = None
        if [int(t) if not isinstance(t, dict) else int(t["id"]) for t in (theirs or [])] != mine:
            raise ServerError(f"the model served at {self.url} ({self.model or 'unnamed'}) does not use the training "
                              "model's tokenizer: its conversations would train the cartridge on the wrong tokens. "
                              "Serve the same model as --model (the bundled one by default).")

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: list[int], max_tokens: int, *, temperature: float, k: int = 0, seed: int = 0,
                 stop_ids: set[int] | None = None) -> Generated:
        """Continue `prompt` (token ids) by up to `max_tokens` tokens; greedy when `temperature` is 0.

        With `k`, the top-k log-probabilities (ids and values) come with every generated token, and with the
        stop token when the answer ended on it."""
        out = self._completion(prompt, max_tokens, temperature, k, seed)
        if stop_ids and out.tokens and out.tokens[-1] in stop_ids:  # a server that returns the stop token itself
            out.tokens.pop()
            out.stopped = True
        if k and out.stopped and len(out.topk_ids) == len(out.tokens):  # the stop token's own row is missing
            row = self._completion(prompt + out.tokens, 1, 0.0, k, seed)
            if not len(row.topk_ids):
                raise ServerError(f"{self.url} returned no log-probabilities for the token after an answer")
            out.topk_ids = np.concatenate([out.topk_ids, row.topk_ids[:1]])
            out.topk_logprobs = np.concatenate([out.topk_logprobs, row.topk_logprobs[:1]])
        return out

    def _completion(self, prompt, max_tokens, temperature, k, seed) -> Generated:
        """One completion, its rows checked: one top-k row per generated token (and the stop token's)."""
        try:
            out = self._complete(prompt, max_tokens, temperature, k, seed)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise ServerError(f"{self.url} answered in a form this client cannot read "
                              f"({type(exc).__name__}: {exc})") from None
        if k and len(out.topk_ids) < len(out.tokens):
            raise ServerError(f"{self.url} returned {len(out.topk_ids)} log-probability rows for {len(out.tokens)} "
                              "tokens")
        return out

    def _llama(self, prompt, max_tokens, temperature, k, seed) -> Generated:
        body = {"prompt": prompt, "n_predict": max_tokens, "temperature": temperature, "seed": seed,
                "return_tokens": True, "cache_prompt": True, "n_probs": k, **LLAMA_PLAIN_SAMPLING}
        out = self._request("POST", "/completion", body)
        tokens = [int(t) for t in out.get("tokens") or []]
        stopped = bool(out.get("stop_type") == "eos" or (out.get("stopped_eos") is True))
        probs = out.get("completion_probabilities") or []
        if not k:
            return Generated(tokens, stopped)
        if len(probs) < len(tokens):
            raise ServerError(f"{self.url} returned {len(probs)} log-probability rows for {len(tokens)} tokens")
        rows = [row.get("top_logprobs") or [] for row in probs[: len(tokens) + (1 if stopped else 0)]]
        return Generated(tokens, stopped, *_rows([[(int(e["id"]), float(e["logprob"])) for e in r] for r in rows], k))

    def _vllm(self, prompt, max_tokens, temperature, k, seed) -> Generated:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "seed": seed, "top_p": 1.0, "return_tokens_as_token_ids": True, "skip_special_tokens": False}
        if k:
            body["logprobs"] = k
        choice = self._request("POST", "/v1/completions", body)["choices"][0]
        stopped = choice.get("finish_reason") == "stop"
        logprobs = choice.get("logprobs") or {}
        token_ids = choice.get("token_ids") or [_token_id(t) for t in logprobs.get("tokens") or []]
        tokens = [int(t) for t in token_ids]
        if not k:
            return Generated(tokens, stopped)
        tops = logprobs.get("top_logprobs") or []
        return Generated(tokens, stopped, *_rows([[(_token_id(t), float(lp)) for t, lp in row.items()]
                                                  for row in tops[: len(tokens)]], k))

    def _sglang(self, prompt, max_tokens, temperature, k, seed) -> Generated:
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": max_tokens, "temperature": temperature,
                                                         "top_p": 1.0, "top_k": -1}}
        if k:
            body.update(return_logprob=True, top_logprobs_num=k, logprob_start_len=-1)
        out = self._request("POST", "/generate", body)
        meta = out.get("meta_info") or {}
        finish = meta.get("finish_reason") or {}
        stopped = isinstance(finish, dict) and finish.get("type") == "stop"
        tokens = [int(t) for t in out.get("output_ids") or [row[1] for row in meta.get("output_token_logprobs") or []]]
        if not k:
            return Generated(tokens, stopped)
        tops = meta.get("output_top_logprobs") or []
        return Generated(tokens, stopped, *_rows([[(int(e[1]), float(e[0])) for e in row] for row in tops
                                                  [: len(tokens)]], k))


def _token_id(token: str) -> int:
    """vLLM writes tokens as `token_id:123` with `return_tokens_as_token_ids`."""
    if not str(token).startswith("token_id:"):
        raise ServerError("the server did not return token ids: start vLLM with a version that supports "
                          "return_tokens_as_token_ids")
    return int(str(token).split(":", 1)[1])


def _rows(rows: list[list[tuple[int, float]]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows as arrays [n, k] (ids int32, log-probs float32), best first."""
    ids = np.zeros((len(rows), k), np.int32)
    lps = np.full((len(rows), k), -1e4, np.float32)
    for i, row in enumerate(rows):
        if len(row) < k:
            raise ServerError(f"the server returned {len(row)} log-probabilities where {k} were asked: raise its "
                              "limit (vLLM: --max-logprobs)")
        row = sorted(row, key=lambda e: -e[1])[:k]
        ids[i] = [e[0] for e in row]
        lps[i] = [e[1] for e in row]
    return ids, lps
