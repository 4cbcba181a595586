"""Builds the requests of a run: random, shared-prefix, ShareGPT prompts, multi-turn sessions, LoRA adapter mix."""
from __future__ import annotations

import asyncio
import json
import math
from dataclasses import asdict, dataclass, field

import aiohttp
import numpy as np

from aegis.errors import AegisError, UsageError

WORKLOADS = ("random", "shared-prefix", "sharegpt", "sessions")
ANSWER_ROLES = ("gpt", "assistant", "chatgpt", "bard", "bing")
GENERATED_TURNS = 8  # turns of a generated (agentic) session unless --turns
APIS = ("completions", "chat")
LORA_MIXES = ("uniform", "zipf", "round-robin")
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]


def _vocabulary(size: int = 4096) -> list[str]:
    """Deterministic pseudo-words (2-3 syllables), the same on every machine."""
    rng = np.random.default_rng(20240611)
    words: set[str] = set()
    while len(words) < size:
        n = int(rng.integers(2, 4))
        words.add("".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), n)))
    return sorted(words)


VOCAB = _vocabulary()


@dataclass
class WorkloadSpec:
    """The workload flags of `aegis bench`."""

    kind: str = "random"
    api: str = "completions"
    input_len: int = 512
    output_len: int | None = 128
    range_ratio: float = 0.0
    num_groups: int = 4
    prompts_per_group: int = 8
    prefix_len: int = 256
    suffix_len: int = 64
    dataset: str | None = None
    lora: list[str] = field(default_factory=list)
    lora_mix: str = "uniform"
    zipf_s: float = 1.0
    seed: int = 0
    tokenize: bool = True
    num_sessions: int = 4            # sessions: conversations held at once
    turns: int | None = None         # sessions: turns each (default: the dataset's, else GENERATED_TURNS)
    think_time: float = 0.0          # sessions: seconds between an answer and the next turn
    system_len: int = 1024           # generated sessions: the shared system prompt's tokens
    turn_len: int = 64               # generated sessions: tokens of each user (tool output) turn

    def validate(self) -> None:
        if self.kind not in WORKLOADS:
            raise UsageError(f"unknown workload {self.kind!r}; choose one of {', '.join(WORKLOADS)}")
        if self.api not in APIS:
            raise UsageError(f"unknown --api {self.api!r}; choose completions or chat")
        if self.lora_mix not in LORA_MIXES:
            raise UsageError(f"unknown --lora-mix {self.lora_mix!r}; choose one of {', '.join(LORA_MIXES)}")
        if not 0 <= self.range_ratio < 1:
            raise UsageError("--range-ratio must be in [0, 1)")
        if self.kind == "sharegpt" and not self.dataset:
            raise UsageError("--workload sharegpt needs --dataset FILE (ShareGPT JSON)")
        for name in ("input_len", "prefix_len", "suffix_len", "num_groups", "prompts_per_group"):
            if getattr(self, name) < 1 and not (name == "suffix_len" and getattr(self, name) == 0):
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
        if self.output_len is not None and self.output_len < 1:
            raise UsageError("--output-len must be positive")
        if self.kind == "sessions":
            if self.api != "chat":
                raise UsageError("--workload sessions sends conversations: use --api chat")
            for name in ("num_sessions", "system_len", "turn_len"):
                if getattr(self, name) < 1:
                    raise UsageError(f"--{name.replace('_', '-')} must be positive")
            if self.turns is not None and self.turns < 1:
                raise UsageError("--turns must be positive")
            if not (self.think_time >= 0 and math.isfinite(self.think_time)):
                raise UsageError("--think-time must be a number of seconds >= 0")


@dataclass
class RequestSpec:
    """One request to send: prompt text, intended lengths, adapter, prefix group."""

    index: int
    prompt: str
    prompt_len: int
    output_len: int
    adapter: str | None = None
    group: int | None = None
    exact: bool = False
    session: int | None = None   # sessions: the conversation, its turn, and (turn 0) its system prompt
    turn: int | None = None
    system: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


class ServerTokenizer:
    """Counts tokens with a server's /tokenize and /detokenize (vLLM's API)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, model: str | None,
                 headers: dict[str, str], concurrency: int = 16):
        self.session, self.url, self.model, self.headers = session, url, model, headers
        self.sem = asyncio.Semaphore(concurrency)
        self.ratio = 1.0  # tokens per pseudo-word, calibrated by probe()

    async def _post(self, path: str, body: dict) -> dict:
        if self.model:
            body = {"model": self.model, **body}
        async with self.sem, self.session.post(self.url + path, json=body, headers=self.headers) as r:
            if r.status != 200:
                raise _NoTokenizer(f"{path} answered HTTP {r.status}")
            return await r.json(content_type=None)

    async def tokenize(self, text: str) -> list[int]:
        return list((await self._post("/tokenize", {"prompt": text, "add_special_tokens": False}))["tokens"])

    async def detokenize(self, ids: list[int]) -> str:
        return (await self._post("/detokenize", {"tokens": ids}))["prompt"]

    async def probe(self) -> bool:
        """True when the server tokenizes; also learns tokens per pseudo-word."""
        words = " ".join(VOCAB[:400])
        try:
            n = len(await self.tokenize(words))
        except (_NoTokenizer, aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
            return False
        self.ratio = max(n / 400, 0.05)
        return True


class _NoTokenizer(Exception):
    pass


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(VOCAB[int(i)] for i in rng.integers(0, len(VOCAB), max(n, 1)))


async def fit_text(tok: ServerTokenizer | None, rng: np.random.Generator, target: int,
                   prefix: str = "", prefix_tokens: int = 0) -> tuple[str, bool]:
    """Text of exactly `target` tokens (prefix included), checked with the server's tokenizer."""
    need = target - prefix_tokens
    if tok is None:
        body = _words(rng, need) if need > 0 else ""
        return (prefix + (" " if prefix and body else "") + body), False
    text = prefix + (" " if prefix else "") + _words(rng, math.ceil(need / tok.ratio) + 1)
    best: tuple[str, int] | None = None
    for _ in range(8):
        ids = await tok.tokenize(text)
        n = len(ids)
        if n == target:
            return text, True
        if best is None or abs(n - target) < best[1]:
            best = (text, abs(n - target))
        if n > target:
            text = await tok.detokenize(ids[:target])
        else:
            text = text + " " + _words(rng, math.ceil((target - n) / tok.ratio) + 1)
    assert best is not None  # set on the loop's first pass
    return best[0], False


def _lengths(spec: WorkloadSpec, rng: np.random.Generator, n: int, base: int) -> np.ndarray:
    if spec.range_ratio == 0:
        return np.full(n, base, dtype=int)
    lo = max(1, int(base * (1 - spec.range_ratio)))
    hi = max(lo, int(base * (1 + spec.range_ratio)))
    return rng.integers(lo, hi + 1, n)


def assign_adapters(spec: WorkloadSpec, n: int) -> list[str | None]:
    """The adapter of each request: uniform, Zipf(s) or round-robin over spec.lora."""
    if not spec.lora:
        return [None] * n
    k = len(spec.lora)
    if spec.lora_mix == "round-robin":
        return [spec.lora[i % k] for i in range(n)]
    rng = np.random.default_rng([spec.seed, 7])
    if spec.lora_mix == "zipf":
        w = 1.0 / np.arange(1, k + 1) ** spec.zipf_s
        picks = rng.choice(k, size=n, p=w / w.sum())
    else:
        picks = rng.integers(0, k, n)
    return [spec.lora[int(i)] for i in picks]


def load_conversations(path: str) -> list[list[tuple[str, str]]]:
    """Each conversation of a ShareGPT-format JSON file as its (user turn, assistant answer) pairs, in order."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as exc:
        raise UsageError(f"cannot read dataset {path!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"dataset {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise UsageError(f"dataset {path!r} must be a JSON list of conversations (ShareGPT format)")
    convs = []
    for entry in data:
        if not isinstance(entry, dict):
            continue
        turns = entry.get("conversations") or entry.get("conversation") or []
        texts = []
        for t in turns if isinstance(turns, list) else []:
            if not isinstance(t, dict):
                continue
            role = t.get("from", t.get("role"))
            value = t.get("value", t.get("content"))
            if isinstance(value, str):
                texts.append((role, value))
        pairs, i = [], 0
        while i + 1 < len(texts):
            (r1, v1), (r2, v2) = texts[i], texts[i + 1]
            if r1 in ("human", "user") and r2 in ANSWER_ROLES:
                pairs.append((v1, v2))
                i += 2
            elif pairs:        # the conversation stops alternating: keep the turns before
                break
            else:
                i += 1
        if pairs:
            convs.append(pairs)
    if not convs:
        raise UsageError(f"dataset {path!r} holds no (human, gpt) conversation pairs")
    return convs


def load_sharegpt(path: str) -> list[tuple[str, str]]:
    """(first user turn, first assistant answer) pairs from a ShareGPT-format JSON file."""
    return [conv[0] for conv in load_conversations(path)]


async def build_sessions(spec: WorkloadSpec, tok: ServerTokenizer | None) -> list[RequestSpec]:
    """The turns of `num_sessions` conversations, session by session (index = position in this list).

    From a ShareGPT file: conversation i (seeded order) gives the user turns, and its answers' lengths the
    output lengths (unless --output-len). Generated (agentic): one shared system prompt of system_len
    tokens, turns of turn_len tokens (tool output sized). The replies are the server's, made at run time.
    """
    plans: list[tuple[str | None, list[tuple[str, int, int, bool]]]] = []  # (system, [(user, len, out, exact)])

    async def count(text):
        return len(await tok.tokenize(text)) if tok else len(text.split())
    if spec.dataset:
        convs = load_conversations(spec.dataset)
        order = np.random.default_rng([spec.seed, 11]).permutation(len(convs))
        for i in range(spec.num_sessions):
            conv = convs[int(order[i % len(convs)])][:spec.turns or None]
            plans.append((None, [(u, await count(u), spec.output_len or max(await count(a), 1), tok is not None)
                                 for u, a in conv]))
    else:
        system, s_exact = await fit_text(tok, np.random.default_rng([spec.seed, 9]), spec.system_len)
        for i in range(spec.num_sessions):
            turns = [await fit_text(tok, np.random.default_rng([spec.seed, 10, i, k]), spec.turn_len)
                     for k in range(spec.turns or GENERATED_TURNS)]
            plans.append((system, [(text, spec.turn_len, spec.output_len or 128, exact and s_exact)
                                   for text, exact in turns]))
    adapters = assign_adapters(spec, len(plans))
    flat = [(i, k, system, turn) for i, (system, turns) in enumerate(plans) for k, turn in enumerate(turns)]
    return [RequestSpec(j, text, plen, olen, adapters[i], None, exact, session=i, turn=k,
                        system=system if k == 0 else None)
            for j, (i, k, system, (text, plen, olen, exact)) in enumerate(flat)]


async def build(spec: WorkloadSpec, n: int, tok: ServerTokenizer | None) -> list[RequestSpec]:
    """The `n` requests of a run; deterministic for a seed (and a server tokenizer)."""
    spec.validate()
    if spec.kind == "sessions":
        return await build_sessions(spec, tok)
    adapters = assign_adapters(spec, n)
    out_default = spec.output_len or 128
    if spec.kind == "random":
        rng = np.random.default_rng([spec.seed, 1])
        ins = _lengths(spec, rng, n, spec.input_len)
        outs = _lengths(spec, np.random.default_rng([spec.seed, 2]), n, out_default)

        async def one(i):
            text, exact = await fit_text(tok, np.random.default_rng([spec.seed, 3, i]), int(ins[i]))
            return RequestSpec(i, text, int(ins[i]), int(outs[i]), adapters[i], None, exact)
        return list(await asyncio.gather(*(one(i) for i in range(n))))

    if spec.kind == "shared-prefix":
        prefixes = await asyncio.gather(*(
            fit_text(tok, np.random.default_rng([spec.seed, 4, g]), spec.prefix_len)
            for g in range(spec.num_groups)))
        pairs = [(g, j) for g in range(spec.num_groups) for j in range(spec.prompts_per_group)]
        order = np.random.default_rng([spec.seed, 5]).permutation(len(pairs))
        total = spec.prefix_len + spec.suffix_len

        async def one(i):
            g, j = pairs[int(order[i % len(pairs)])]
            prefix, p_exact = prefixes[g]
            text, exact = await fit_text(tok, np.random.default_rng([spec.seed, 6, g, j]), total,
                                         prefix=prefix, prefix_tokens=spec.prefix_len)
            return RequestSpec(i, text, total, out_default, adapters[i], g, exact and p_exact)
        return list(await asyncio.gather(*(one(i) for i in range(n))))

    assert spec.dataset is not None  # validate() requires --dataset for sharegpt
    convs = load_sharegpt(spec.dataset)
    order = np.random.default_rng([spec.seed, 8]).permutation(len(convs))

    async def count(text):
        return len(await tok.tokenize(text)) if tok else len(text.split())

    async def one_conv(i):
        prompt, answer = convs[int(order[i % len(convs)])]
        plen = await count(prompt)
        olen = spec.output_len or max(await count(answer), 1)
        return RequestSpec(i, prompt, plen, olen, adapters[i], None, tok is not None)
    return list(await asyncio.gather(*(one_conv(i) for i in range(n))))


def save(path: str, requests: list[RequestSpec]) -> None:
    with open(path, "w") as fh:
        for r in requests:
            fh.write(json.dumps(r.to_json()) + "\n")


def load(path: str) -> list[RequestSpec]:
    try:
        with open(path) as fh:
            return [RequestSpec(**json.loads(line)) for line in fh if line.strip()]
    except (OSError, ValueError, TypeError) as exc:
        raise AegisError(f"cannot read the saved workload {path!r} ({exc}); start a new run "
                         "instead of --resume") from None
