"""OpenAI-compatible HTTP serving of a registered model (``lora-pipeline serve NAME@ALIAS``).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's own chat template is
applied, as in training and evaluation) and ``GET /health``. Made for CPU smoke tests, demos and
small internal services; for GPU serving at scale use vLLM (see ``deployments/README.md``). The
version behind ``NAME@ALIAS`` is loaded from the MLflow registry (merged or adapter form) and the
alias is followed: a promotion or rollback swaps the new version in without dropping requests.
Greedy requests (``temperature`` 0, no ``seed``) waiting for the model are generated together, up to
``max_batch`` in one left-padded ``generate`` (:mod:`lora_pipeline.serving_batch`), each answer the same
as alone; a sampled or seeded request runs alone, as reproducible per seed as before. The prefix that
requests share (e.g. the chat template's system prompt) is prefilled once and its KV cache reused
(:mod:`lora_pipeline.serving_prefix`). Generation stops at every id of the model's generation config (its
whole stop set).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, Field

from lora_pipeline.formatting import encode_generation_prompt
from lora_pipeline.serving_batch import (DEFAULT_GATHER_SECONDS, DEFAULT_LINGER_SECONDS, DEFAULT_MAX_BATCH,
                                          Batcher, generate_rows)
from lora_pipeline.serving_prefix import PrefixCache, cache_argument

logger = logging.getLogger(__name__)

#: Generation budget when a request does not say (OpenAI's completions default is 16).
DEFAULT_MAX_TOKENS = 64
#: Requests admitted at once (generating or waiting for the model) before the server answers 429.
DEFAULT_MAX_QUEUE = 32
#: Longest text accepted in one field: far beyond any context window, short enough to tokenize quickly.
MAX_TEXT_CHARS = 200_000
#: The API key `serve` requires (``Authorization: Bearer <key>``) when set; needed to bind beyond loopback.
API_KEY_ENV = "LORA_PIPELINE_SERVE_API_KEY"


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT_CHARS)


class _SamplingRequest(BaseModel):
    model: str | None = None
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    # Refused when true (see build_app): an OpenAI client asking to stream would wait for events forever.
    stream: bool = False


class CompletionRequest(_SamplingRequest):
    prompt: str = Field(max_length=MAX_TEXT_CHARS)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)


class PromptTooLong(ValueError):
    """The prompt and the requested completion do not fit the model's context window."""


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


class TextGenerator:
    """A causal LM and its tokenizer: prompt ids in, decoded text and finish reason out.

    Requests are queued in a :class:`~lora_pipeline.serving_batch.Batcher` of this generator alone
    (so two models' requests never share a batch) and never generate at once on the shared model.

    Args:
        max_batch: Greedy requests generated together at most (1: one at a time).
        gather_seconds, linger_seconds: How long a batch waits for requests on their way
            (:mod:`lora_pipeline.serving_batch`).
        reuse_prefix: Keep the KV cache of the prompt prefix requests share (e.g. the chat template's system
            prompt) and prefill only the rest (:mod:`lora_pipeline.serving_prefix`); models that take no
            cache are generated as before.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = DEFAULT_MAX_BATCH,
                 gather_seconds: float = DEFAULT_GATHER_SECONDS,
                 linger_seconds: float = DEFAULT_LINGER_SECONDS, reuse_prefix: bool = True) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
        # Padding is masked out; a tokenizer without a pad token pads with a stop id, as generate() would.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        config = getattr(model, "config", None)
        self.context_window: int | None = getattr(config, "max_position_embeddings", None)
        self.prefix_cache = PrefixCache(model) if reuse_prefix and cache_argument(model) else None
        self.batcher: Batcher[tuple[list[int], _SamplingRequest], GenerationResult] = Batcher(
            self._generate_batch, max_batch, can_join=self._fits_together, gather_seconds=gather_seconds,
            linger_seconds=linger_seconds)

    def check_fits(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Raise :class:`PromptTooLong` when prompt + completion exceed the context window (as OpenAI does)."""
        if self.context_window is not None and len(prompt_ids) + max_tokens > self.context_window:
            raise PromptTooLong(f"this model's context window is {self.context_window} tokens; the request needs "
                                f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt, {max_tokens} "
                                "in the completion): shorten the prompt or lower max_tokens")

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_generation_prompt(self.tokenizer, messages)  # exactly as evaluation prompts

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def generate(self, prompt_ids: list[int], request: _SamplingRequest) -> GenerationResult:
        """Continue ``prompt_ids``; ``finish_reason`` is ``stop`` when a stop id ended the answer.

        Blocks until the answer is generated, alone or in a batch with other greedy requests.
        """
        batchable = request.temperature == 0 and request.seed is None
        return self.batcher.submit((list(prompt_ids), request), batchable)

    def _fits_together(self, batch: list[tuple[list[int], _SamplingRequest]],
                       job: tuple[list[int], _SamplingRequest]) -> bool:
        """Every row of a batch runs to the batch's largest budget: it must stay within the context window."""
        if self.context_window is None:
            return True
        rows = [*batch, job]
        budget = max(request.max_tokens for _, request in rows)
        return max(len(prompt) for prompt, _ in rows) + budget <= self.context_window

    def _generate_batch(self, jobs: list[tuple[list[int], _SamplingRequest]]) -> list[GenerationResult]:
        """One ``generate`` for ``jobs``: a lone request, or greedy requests left-padded together."""
        request = jobs[0][1]  # a batch of several is all greedy: the same options for every row
        sampling = request.temperature > 0
        options: dict[str, Any] = {"do_sample": sampling}
        if sampling:
            options.update(temperature=request.temperature, top_p=request.top_p)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        rows = generate_rows(self.model, [prompt for prompt, _ in jobs], [job.max_tokens for _, job in jobs],
                             stop_ids=self.eos_ids, pad_id=self.pad_id, prefix_cache=self.prefix_cache, **options)
        return [self._result(new_tokens, prompt) for new_tokens, (prompt, _) in zip(rows, jobs, strict=True)]

    def _result(self, new_tokens: list[int], prompt_ids: list[int]) -> GenerationResult:
        """One answer, cut at its first stop id: what the request gets when generated alone."""
        stop_at = next((i for i, token in enumerate(new_tokens) if token in self.eos_ids), None)
        answer = new_tokens if stop_at is None else new_tokens[:stop_at]
        return GenerationResult(
            text=self.tokenizer.decode(answer, skip_special_tokens=True),
            finish_reason="length" if stop_at is None else "stop",
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(answer) + (stop_at is not None),
        )


def _usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


@dataclass(frozen=True)
class Served:
    """What the server answers with: a generator and what it is (name, alias, version). Swapped whole."""

    generator: TextGenerator
    info: dict[str, str]


class ModelSource(Protocol):
    """Where each request gets the model it is answered by (read once per request)."""

    def current(self) -> Served: ...


class FixedModel:
    """A source that always serves the same model."""

    def __init__(self, generator: TextGenerator, info: dict[str, str] | None = None) -> None:
        self._served = Served(generator, dict(info or {}))

    def current(self) -> Served:
        return self._served


def build_app(source: ModelSource, model_name: str, *, max_queue: int = DEFAULT_MAX_QUEUE,
              api_key: str | None = None) -> Any:
    """The FastAPI app serving ``source`` under ``model_name`` (what ``/v1/models`` and replies report).

    Each request takes ``source.current()`` once, so a model swapped in while it runs never answers
    half of it: requests in flight finish on the model they started with (each model batches only its
    own requests). At most ``max_queue`` requests are admitted at once (up to the generator's
    ``max_batch`` generate together, the rest wait for the model); more get 429 with
    ``Retry-After``. A prompt that does not fit the context window gets 400 saying so. With ``api_key``,
    every ``/v1`` request needs ``Authorization: Bearer <api_key>`` (``/health`` stays open for probes).
    """
    import hmac
    from contextlib import contextmanager

    from fastapi import Depends, FastAPI, Header, HTTPException

    admission = threading.BoundedSemaphore(max_queue)

    def authorized(authorization: str | None = Header(default=None)) -> None:
        if api_key is not None and not hmac.compare_digest(authorization or "", f"Bearer {api_key}"):
            raise HTTPException(status_code=401, detail="missing or wrong API key (Authorization: Bearer <key>)",
                                headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="lora-pipeline model server", version="1")
    guarded = [Depends(authorized)]

    @contextmanager
    def admitted(request: _SamplingRequest):
        if request.stream:
            raise HTTPException(status_code=400, detail="stream=true is not supported by this server; "
                                "send stream=false (or serve with vLLM for streaming)")
        if not admission.acquire(blocking=False):
            raise HTTPException(status_code=429, detail=f"busy: {max_queue} requests are already queued; retry "
                                "shortly", headers={"Retry-After": "1"})
        try:
            yield
        except PromptTooLong as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        finally:
            admission.release()

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **source.current().info}

    @app.get("/v1/models", dependencies=guarded)
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "lora-pipeline"}]}

    @app.post("/v1/completions", dependencies=guarded)
    def completions(request: CompletionRequest) -> dict[str, Any]:
        with admitted(request):
            generator = source.current().generator
            with generator.batcher.arriving():  # a batch being gathered waits for this request
                prompt_ids = generator.text_prompt_ids(request.prompt)
                generator.check_fits(prompt_ids, request.max_tokens)
                result = generator.generate(prompt_ids, request)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "usage": _usage(result),
                "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason,
                             "logprobs": None}]}

    @app.post("/v1/chat/completions", dependencies=guarded)
    def chat_completions(request: ChatCompletionRequest) -> dict[str, Any]:
        with admitted(request):
            messages = [message.model_dump() for message in request.messages]
            generator = source.current().generator
            with generator.batcher.arriving():  # a batch being gathered waits for this request
                prompt_ids = generator.chat_prompt_ids(messages)
                generator.check_fits(prompt_ids, request.max_tokens)
                result = generator.generate(prompt_ids, request)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "usage": _usage(result),
                # lstrip: SentencePiece-style tokenizers decode the first answer token with its prefix space.
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text.lstrip()},
                             "finish_reason": result.finish_reason}]}

    return app


def parse_model_reference(reference: str) -> tuple[str, str]:
    """``NAME@ALIAS`` -> (name, alias).

    Raises:
        ValueError: neither form.
    """
    name, sep, alias = reference.partition("@")
    if sep and name and alias:
        return name, alias
    raise ValueError(f"expected NAME@ALIAS (e.g. my-model@champion), got {reference!r}")


def load_version(tracking_uri: str, name: str, version: str, *,
                 max_batch: int = DEFAULT_MAX_BATCH) -> TextGenerator:
    """One registered version, merged or adapter form, ready to serve (``max_batch``: see :class:`TextGenerator`).

    An adapter is merged into its base in memory: one adapter per server, so unmerged LoRA matmuls
    would only slow every token down.
    """
    from lora_pipeline.loading import load_registered_model

    loaded = load_registered_model(f"models:/{name}/{version}", tracking_uri, merge_adapter=True)
    return TextGenerator(loaded.model, loaded.tokenizer, max_batch=max_batch)


class AliasFollower:
    """Serves ``NAME@ALIAS`` and follows the alias: after a promotion or rollback the new version is
    loaded next to the one being served, then swapped in at once, so no request is dropped.

    Args:
        tracking_uri: Registry that resolves the alias.
        reference: ``NAME@ALIAS``.
        load: Loads one version (default :func:`load_version`); injectable for tests.

    Raises:
        ValueError: ``reference`` is not ``NAME@ALIAS``.
        LookupError: the alias does not exist (yet).
    """

    def __init__(self, tracking_uri: str, reference: str,
                 load: Callable[[str, str, str], TextGenerator] = load_version) -> None:
        self.tracking_uri = tracking_uri
        self.name, self.alias = parse_model_reference(reference)
        self._load = load
        version = self._version()
        if version is None:
            raise LookupError(f"registered model {self.name!r} has no alias {self.alias!r} in {tracking_uri}")
        self._served = self._serve(version)
        self._stop = threading.Event()

    def _version(self) -> str | None:
        from lora_pipeline.promotion import version_by_alias

        return version_by_alias(self.tracking_uri, self.name, self.alias)

    def _serve(self, version: str) -> Served:
        generator = self._load(self.tracking_uri, self.name, version)
        return Served(generator, {"name": self.name, "alias": self.alias, "version": version})

    def current(self) -> Served:
        return self._served

    def refresh(self) -> bool:
        """Serve the alias's version if it moved; True when a new version was swapped in."""
        version = self._version()
        if version is None or version == self._served.info["version"]:
            return False  # a deleted alias keeps the last version serving rather than failing requests
        previous = self._served.info["version"]
        self._served = self._serve(version)  # loaded first: the old version answers meanwhile
        logger.info("%s@%s moved: now serving version %s (was %s)", self.name, self.alias, version, previous)
        return True

    def follow(self, interval_seconds: float) -> threading.Thread:
        """Check the alias every ``interval_seconds`` in a daemon thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.wait(interval_seconds):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - a registry hiccup must not stop serving what is loaded
                    logger.exception("could not check %s@%s; still serving version %s", self.name, self.alias,
                                     self._served.info["version"])

        thread = threading.Thread(target=loop, name=f"follow-{self.name}@{self.alias}", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
