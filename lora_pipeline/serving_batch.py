"""Request batching for ``serve``: the requests waiting for one model are generated together.

A :class:`Batcher` has no thread of its own. Each request queues itself; whichever request finds the
model free becomes the leader: it takes the oldest queued request and, when that one is batchable,
every other batchable request behind it (up to ``max_batch``), runs them as one batch outside the
lock, hands each its result, and frees the model for the next leader. There is nothing to start or
stop, a generator swapped out of service is freed with its last request, and the queue stays first in,
first out: a request that cannot join a batch (sampled, or too long to share one) keeps its place and
heads a later batch.

Before it runs, a batch waits, at most ``gather_seconds``, for the requests it can expect: those already
announced (:meth:`Batcher.arriving`: in the server, being tokenized) and as many as the previous batch
saw (its own plus those that arrived while it ran), since the clients it has just answered are likely
sending their next request. A request that expects nobody and finds itself alone lingers
``linger_seconds`` (10 ms), as Ray Serve's ``batch_wait_timeout_s`` does, so that clients starting
together share the first batch; a lone client pays those 10 ms per request. While requests keep coming
(each within ``linger_seconds`` of the one before), the batch keeps taking them, for ``gather_seconds``
at most: 8 clients starting together reached the batcher over 23 ms here (2 ms, then 9 ms gaps), and
without this the first two made a batch of their own and the burst took three batches instead of two.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lora_pipeline.serving_prefix import PrefixCache

#: Requests generated together at most (``serve --max-batch``).
DEFAULT_MAX_BATCH = 8
#: Longest a batch that is not full waits for the requests it expects (see the module docstring).
DEFAULT_GATHER_SECONDS = 0.05
#: How long a request alone in the queue, expecting nobody, waits for company.
DEFAULT_LINGER_SECONDS = 0.01

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(eq=False)
class _Job(Generic[Item, Result]):
    item: Item
    batchable: bool
    done: bool = False
    result: Result | None = None
    error: BaseException | None = None


class Batcher(Generic[Item, Result]):
    """Runs ``run(items) -> results`` (one result per item, in order) on batches of submitted items.

    Args:
        run: Generates a batch; it is never called twice at once.
        max_batch: Items per batch at most (1: one at a time).
        can_join: ``can_join(batch, item)``: may ``item`` join the batchable ``batch``? (default: yes).
        gather_seconds, linger_seconds: See the module docstring (0: never wait).

    Raises:
        ValueError: ``max_batch`` below 1 or a negative wait.
    """

    def __init__(self, run: Callable[[list[Item]], Sequence[Result]], max_batch: int = DEFAULT_MAX_BATCH, *,
                 can_join: Callable[[list[Item], Item], bool] | None = None,
                 gather_seconds: float = DEFAULT_GATHER_SECONDS,
                 linger_seconds: float = DEFAULT_LINGER_SECONDS) -> None:
        if max_batch < 1 or min(gather_seconds, linger_seconds) < 0:
            raise ValueError(f"max_batch must be >= 1 and the waits >= 0 (got {max_batch}, {gather_seconds}, "
                             f"{linger_seconds})")
        self.max_batch, self.gather_seconds, self.linger_seconds = max_batch, gather_seconds, linger_seconds
        self._run, self._can_join = run, can_join or (lambda batch, item: True)
        self._cond = threading.Condition()
        self._queue: list[_Job[Item, Result]] = []
        self._busy = False  # a leader is gathering or running a batch
        self._load = 1  # requests the previous batch saw: its own plus those that queued while it ran
        self._arriving = 0  # announced and not yet queued
        self._last_arrival = 0.0  # monotonic time the latest request was queued
        self._local = threading.local()  # .announced: this thread's request is counted in _arriving

    @property
    def waiting(self) -> int:
        """Requests queued for the model and not yet taken into a batch."""
        with self._cond:
            return len(self._queue)

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce this thread's request before it reaches :meth:`submit` (e.g. while it is tokenized),
        so that a batch being gathered waits for it; leaving without submitting withdraws it."""
        with self._cond:
            self._arriving += 1
        self._local.announced = True
        try:
            yield
        finally:
            if self._local.announced:  # refused before submit (e.g. too long)
                self._local.announced = False
                with self._cond:
                    self._arriving -= 1
                    self._cond.notify_all()

    def submit(self, item: Item, batchable: bool) -> Result:
        """``item``'s result, generated alone or in a batch; an error of its batch is raised here.

        A request that is not ``batchable`` (e.g. sampled with a seed) always runs alone.
        """
        job: _Job[Item, Result] = _Job(item, batchable)
        with self._cond:
            if getattr(self._local, "announced", False):
                self._local.announced = False
                self._arriving -= 1
            self._queue.append(job)
            self._last_arrival = time.monotonic()
            self._cond.notify_all()  # a leader gathering a batch may be waiting for this one
            while not job.done:
                if self._busy:
                    self._cond.wait()
                else:
                    self._lead()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _lead(self) -> None:
        """Take the next batch, run it without the lock, deliver its results (called with the lock held)."""
        self._busy = True
        batch: list[_Job[Item, Result]] = []
        try:
            batch = self._gather()
            self._cond.release()
            try:
                results: Sequence[Result] | None = None
                error: BaseException | None = None
                try:
                    results = self._run([job.item for job in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"a batch of {len(batch)} requests got {len(results)} results")
                except BaseException as exc:  # noqa: BLE001 - delivered to every request of the batch
                    error = exc
            finally:
                self._cond.acquire()
            for index, job in enumerate(batch):
                if error is None:
                    job.result = results[index]  # type: ignore[index]
                job.error, job.done = error, True
            self._load = len(batch) + len(self._queue)
        finally:
            self._busy = False
            self._cond.notify_all()

    def _expected(self) -> int:
        return min(self.max_batch, max(self._load, len(self._queue) + self._arriving))

    def _next_batch(self) -> list[_Job[Item, Result]]:
        head, batch = self._queue[0], [self._queue[0]]
        if not head.batchable:
            return batch
        for job in self._queue[1:]:
            if len(batch) == self.max_batch:
                break
            if job.batchable and self._can_join([queued.item for queued in batch], job.item):
                batch.append(job)
        return batch

    def _gather(self) -> list[_Job[Item, Result]]:
        """The next batch, once the requests it can expect are queued (see the module docstring)."""
        started = time.monotonic()
        while self._queue[0].batchable and len(self._queue) < self.max_batch:
            if len(self._queue) < self._expected():
                deadline = started + self.gather_seconds
            elif len(self._queue) == 1 or self._last_arrival > started:
                # Alone, or company arrived while gathering: wait while requests keep coming.
                deadline = min(self._last_arrival + self.linger_seconds,
                               started + max(self.gather_seconds, self.linger_seconds))
            else:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        batch = self._next_batch()
        for job in batch:
            self._queue.remove(job)
        return batch


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``prompts`` padded on the left to the longest.

    Left, so that every row continues from its own last token; ``generate`` derives each row's
    position ids from the mask, so a padded prompt is positioned as it is alone.
    """
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_rows(model: Any, prompts: Sequence[Sequence[int]], budgets: Sequence[int], *, stop_ids: Iterable[int],
                  pad_id: int, prefix_cache: PrefixCache | None = None, **options: Any) -> list[list[int]]:
    """One ``model.generate`` for ``prompts`` left-padded together: each row's new tokens, cut at its own budget.

    A lone prompt is generated unpadded, as before batching. A row done before the others (a stop id, its
    budget) is followed by pad ids: callers cut at the first stop id. With ``prefix_cache``, the prefix every
    prompt shares comes from it and only the rest is prefilled: each row is the prefix, then its own tokens
    left-padded (the padding, masked out, sits between the two; position ids follow the mask).
    """
    device = next(model.parameters()).device
    shared, cache = prefix_cache.take(prompts) if prefix_cache is not None else (0, None)
    input_ids, attention_mask = left_pad([prompt[shared:] for prompt in prompts], pad_id, device)
    if shared:
        prefix = torch.tensor([list(prompts[0][:shared])] * len(prompts), dtype=torch.long, device=device)
        input_ids = torch.cat([prefix, input_ids], dim=1)
        attention_mask = torch.cat([torch.ones_like(prefix), attention_mask], dim=1)
        options[prefix_cache.argument] = cache  # type: ignore[union-attr]
    width = input_ids.shape[1]
    if len(set(budgets)) > 1:  # each row stops at its own budget, the batch once every row is done
        options["stopping_criteria"] = StoppingCriteriaList([RowBudgets(width, budgets)])
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(budgets),
                            eos_token_id=sorted(stop_ids), pad_token_id=pad_id, **options)
    return [output[row, width:width + budget].tolist() for row, budget in enumerate(budgets)]


class RowBudgets(StoppingCriteria):
    """Ends each row of a batch at its own token budget: ``generate`` stops once every row is done (a stop id
    or its budget) instead of running all rows to the largest budget. Rows done early get pad ids, cut anyway.

    Args:
        prompt_width: Width of the (left-padded) prompts: the tokens after it are generated ones.
        budgets: Each row's ``max_tokens``.
    """

    def __init__(self, prompt_width: int, budgets: Sequence[int]) -> None:
        self.prompt_width, self.budgets = prompt_width, torch.tensor(list(budgets))

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_width) >= self.budgets.to(input_ids.device)
