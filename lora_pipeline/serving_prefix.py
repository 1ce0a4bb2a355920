"""The KV cache of the prompt prefix that ``serve``'s requests share, computed once and reused.

Chat requests to one model start alike: the chat template's default system prompt (SmolLM2's is 30
tokens of its ~44-token prompts) or a service's fixed instructions. Every request used to run its
prefill over that prefix again. A :class:`PrefixCache` keeps the keys and values of the prefix and
hands a copy to each batch whose prompts all start with it, so that ``generate`` runs the prefill over
each request's own tokens only, as vLLM's automatic prefix caching does (for one prefix, not a tree).

Which prefix: one that requests have been seen to share, of at least ``min_tokens`` tokens. A batch
whose prompts all start with the kept prefix takes it. Otherwise the tokens its prompts share with the
kept prefix, or with the previous request's prompt, or among themselves (in that order: the shorter,
older prefix is the likelier to serve the next requests too) are prefilled once and kept instead. A
request that shares too little with anything is generated as before, in one prefill, and leaves the kept
prefix alone. Only models whose cache is a plain ``DynamicCache`` of full-attention layers take part;
others (sliding-window, recurrent layers) are generated as before.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch

#: Shortest shared prefix worth keeping: below this, the prefix's own forward pass costs about what it saves.
MIN_SHARED_PREFIX_TOKENS = 16


def cache_argument(model: Any) -> str | None:
    """The keyword under which ``model``'s forward takes a KV cache (transformers renamed ``past_key_values``
    to ``cache`` within 5.x), or None when it takes none (then no prefix is cached)."""
    forward = getattr(model, "forward", None)
    if not callable(forward) or not hasattr(model, "config"):
        return None
    parameters = inspect.signature(forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares."""
    shortest = min(len(sequence) for sequence in sequences)
    for index in range(shortest):
        token = sequences[0][index]
        if any(sequence[index] != token for sequence in sequences):
            return index
    return shortest


class PrefixCache:
    """Keeps the KV cache of one shared prompt prefix of ``model`` (see the module docstring).

    Not thread-safe: one batch at a time, as :class:`~lora_pipeline.serving_batch.Batcher` runs them.

    Args:
        model: A transformers causal LM (:func:`cache_argument` must find its cache keyword).
        min_tokens: Shortest prefix kept.

    Raises:
        ValueError: ``model`` takes no KV cache.
    """

    def __init__(self, model: Any, min_tokens: int = MIN_SHARED_PREFIX_TOKENS) -> None:
        argument = cache_argument(model)
        if argument is None:
            raise ValueError(f"{type(model).__name__} takes no KV cache: no prefix can be reused")
        self.model, self.min_tokens, self.argument = model, min_tokens, argument
        # The prefix's logits are never read: only the last position's are computed, where the model allows it.
        self._last_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.enabled = True  # off for good once the model's cache turns out not to be plain full attention
        self.ids: list[int] = []  # the kept prefix
        self._cache: Any = None  # its KV cache
        self._previous: list[int] = []  # the previous request's prompt: the next one may share its start

    def take(self, prompts: Sequence[Sequence[int]]) -> tuple[int, Any]:
        """``(length, cache)``: how many leading tokens of every prompt ``cache`` holds, and a copy of it
        repeated for ``len(prompts)`` rows, for ``generate`` to continue; ``(0, None)`` when there is none."""
        if not self.enabled:
            return 0, None
        room = min(len(prompt) for prompt in prompts) - 1  # each row keeps a token of its own to prefill
        kept = len(self.ids)
        previous, self._previous = self._previous, list(prompts[0])
        if not (0 < kept <= room and all(list(prompt[:kept]) == self.ids for prompt in prompts)):
            shared = [min(room, common_prefix_length([seen, *prompts])) for seen in (self.ids, previous) if seen]
            if len(prompts) > 1:
                shared.append(min(room, common_prefix_length(prompts)))
            length = next((length for length in shared if length >= self.min_tokens), 0)
            if not length:
                return 0, None
            cache = self._prefill(list(prompts[0][:length]))
            if cache is None:
                return 0, None
            self.ids, self._cache = list(prompts[0][:length]), cache
        cache = copy.deepcopy(self._cache)
        if len(prompts) > 1:
            cache.batch_repeat_interleave(len(prompts))
        return len(self.ids), cache

    @torch.no_grad()
    def _prefill(self, ids: list[int]) -> Any:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        device = next(self.model.parameters()).device
        options: dict[str, Any] = {self.argument: cache, "use_cache": True}
        if self._last_logits_only:
            options["logits_to_keep"] = 1
        self.model(input_ids=torch.tensor([ids], device=device), **options)
        # Copying, repeating and continuing are exact for full-attention layers only (not sliding windows,
        # not recurrent states): any other model is generated as before.
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            self.enabled = False
            return None
        return cache
