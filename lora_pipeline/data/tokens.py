"""Template and tokenize many rows at once, with exactly the outcome of the one-row formatter.

:func:`lora_pipeline.formatting.tokenize_row` renders a conversation through ``apply_chat_template``
once for the whole conversation and once per answer (its generation prompt), and tokenizes each
rendering separately: two template calls and two tokenizer calls per two-turn row. Here a chunk of rows
is rendered first (the same Jinja template, compiled once), then every rendering of the chunk goes
through the fast tokenizer in one batched call (Rust, all cores, without the GIL: the data stage runs it
in a worker thread while it cleans and renders the next chunk). The samples' counts are derived from
the same token ids by the same rules, so token counts, truncation, trainable tokens and stop tokens are
the per-row path's, and any row the fast path is unsure of (a template error, a prefix mismatch, an
answer with no stop token, anything unusual) is handed to ``tokenize_row`` itself, which gives the
verdict and the error message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lora_pipeline.formatting import PROBE_CONVERSATION, IGNORE_INDEX, RowFormatError, tokenize_row

#: Texts for the start-up check that the fast renderer/encoder give what the tokenizer's own calls give.
_PROBE_TEXTS = ("<s>hello world</s>", "  two  spaces\nand a newline ", "caf\u00e9 \u2014 na\u00efve", "")


class SampleCounts(NamedTuple):
    """What the data stage needs of a :class:`~lora_pipeline.formatting.TokenizedSample` (same names)."""

    full_length: int
    n_trainable: int
    truncated: bool
    answers_in_budget: int
    trained_stops: int

    @classmethod
    def of(cls, sample: Any) -> SampleCounts:
        return cls(sample.full_length, sample.n_trainable, sample.truncated, sample.answers_in_budget,
                   sample.trained_stops)


def _template_renderer(tokenizer: Any) -> Callable[[list[dict[str, str]], bool], str] | None:
    """Render like ``apply_chat_template(messages, tokenize=False)``, without its per-call overhead.

    ``apply_chat_template`` compiles the template (cached) and renders it with the messages, no tools or
    documents, ``add_generation_prompt`` and the special-tokens map. The data stage's rows are plain
    ``{"role", "content"}`` string dicts, which that call passes through unchanged. None when the
    template cannot be compiled this way or the result differs on a probe: the public call is used then
    (and a template that raises on a row always goes to the per-row path, which gives its error).
    """
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(tokenizer.get_chat_template())
        variables: dict[str, Any] = {}
        for key, value in tokenizer.special_tokens_map.items():
            if isinstance(value, (list, tuple)) and all(type(item) is str for item in value):
                variables[key] = type(value)(value)  # what transformers' plain-data copy passes
            elif type(value) is str:
                variables[key] = value
            else:
                return None  # anything richer: leave the conversion to transformers

        # What Template.render does, minus merging the template's globals (a ChainMap) into a new dict on every
        # call, twice (half its cost): they are merged once, and each call gets its own copy of the merge. (The
        # context's record of which names are globals only matters to {% import %}, which chat templates lack.)
        from jinja2.runtime import new_context

        merged = {**compiled.globals, "tools": None, "documents": None, **variables}
        environment, name, blocks = compiled.environment, compiled.name, compiled.blocks
        concat, root = environment.concat, compiled.root_render_func

        def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
            context = dict(merged)
            context["messages"], context["add_generation_prompt"] = messages, generation_prompt
            return concat(root(new_context(environment, name, blocks, context, shared=True)))

        probe = [dict(message) for message in PROBE_CONVERSATION]
        for messages, generation_prompt in ((probe, False), (probe[:1], True)):
            expected = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                     tokenize=False)
            if render(messages, generation_prompt) != expected:
                return None
        return render
    except Exception:  # noqa: BLE001  # any surprise: the public path is always right
        return None


def _batch_encoder(tokenizer: Any) -> tuple[Callable[[list[str]], Any], Callable[[Any], list[list[int]]]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]`` in two steps: (encode, ids).

    ``encode`` is the Rust tokenizer's batch call itself when that is what the transformers call would do
    (a plain fast tokenizer with no truncation, padding or special-token splitting configured): it holds
    no GIL while it runs, so another thread can go on meanwhile; ``ids`` then turns its encodings into
    lists (Python work, GIL). Otherwise, or if a probe disagrees, ``encode`` is the transformers call.
    """

    def public(texts: list[str]) -> list[list[int]]:
        return list(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []

    def as_is(ids: Any) -> list[list[int]]:
        return ids

    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        backend = tokenizer.backend_tokenizer
        plain = (isinstance(tokenizer, TokenizersBackend)
                 and type(tokenizer).__call__ is PreTrainedTokenizerBase.__call__
                 and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
                 and backend.truncation is None and backend.padding is None
                 and not backend.encode_special_tokens and not getattr(tokenizer, "split_special_tokens", False))
        if not plain:
            return public, as_is
        encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

        def direct(texts: list[str]) -> Any:
            return encode_batch(texts, add_special_tokens=False)

        def ids(encodings: Any) -> list[list[int]]:
            return [encoding.ids for encoding in encodings]

        probe = [*_PROBE_TEXTS, *(tokenizer.all_special_tokens or [])]
        return (direct, ids) if ids(direct(probe)) == public(probe) else (public, as_is)
    except Exception:  # noqa: BLE001
        return public, as_is


@dataclass
class Prepared:
    """A batch of rows with its chat templates rendered (see :meth:`BatchTokenizer.prepare`)."""

    rows: list[dict[str, Any]]
    texts: list[str] = field(default_factory=list)  # every rendering of the batch, tokenized in one call
    plans: list[tuple[int, int]] = field(default_factory=list)  # (row index, its first rendering in texts)
    per_row: list[int] = field(default_factory=list)  # rows for tokenize_row itself (template errors ...)
    texts_rows: list[int] = field(default_factory=list)  # ``text`` rows


class BatchTokenizer:
    """Turns clean rows into the training samples' counts, a chunk at a time, as ``tokenize_row`` would.

    Args:
        tokenizer: The training tokenizer (with its chat template for chat rows).
        max_length: Token budget per sample (``data.max_length``).
        stop_ids: The stop set every answer must end in.
    """

    def __init__(self, tokenizer: Any, max_length: int, stop_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.stop_ids = list(stop_ids)
        self._stops = frozenset(self.stop_ids)
        self._render = None
        if getattr(tokenizer, "chat_template", None):
            self._render = _template_renderer(tokenizer) or (
                lambda messages, generation_prompt: tokenizer.apply_chat_template(
                    messages, add_generation_prompt=generation_prompt, tokenize=False))
        self._encode, self._ids = _batch_encoder(tokenizer)
        self.n_fallbacks = 0  # rows handed to tokenize_row (template errors, unusual rows)

    def _one(self, row: dict[str, Any]) -> SampleCounts | RowFormatError:
        """The per-row formatter's verdict (the reference path)."""
        self.n_fallbacks += 1
        try:
            return SampleCounts.of(tokenize_row(self.tokenizer, row, self.max_length, self.stop_ids))
        except RowFormatError as exc:
            return exc

    def counts(self, rows: Sequence[dict[str, Any]]) -> list[SampleCounts | RowFormatError]:
        """Each row's sample counts, or the :class:`RowFormatError` ``tokenize_row`` raises for it."""
        prepared = self.prepare(rows)
        return self.finish(prepared, self.encode(prepared))

    def prepare(self, rows: Sequence[dict[str, Any]]) -> Prepared:
        """Render the chat templates of ``rows`` (pure Python: never touches the tokenizer itself, so it may
        run while another batch's :meth:`encode` runs in a worker thread)."""
        prepared = Prepared(list(rows))
        for i, row in enumerate(prepared.rows):
            if "messages" not in row:
                prepared.texts_rows.append(i)
                continue
            rendered = self._renderings(row["messages"]) if self._render is not None else None
            if rendered is None:
                prepared.per_row.append(i)
                continue
            prepared.plans.append((i, len(prepared.texts)))
            prepared.texts += rendered
        return prepared

    def encode(self, prepared: Prepared) -> Any:
        """Tokenize every rendering of a prepared batch in one call (the only step a worker thread may run)."""
        return self._encode(prepared.texts) if prepared.texts else []

    def finish(self, prepared: Prepared, encoded: Any) -> list[SampleCounts | RowFormatError]:
        """Each row's counts from its batch's :meth:`encode` (rows in doubt, and ``text`` rows, are tokenized
        here: call it when no :meth:`encode` is running)."""
        rows = prepared.rows
        out: list[SampleCounts | RowFormatError | None] = [None] * len(rows)
        ids = self._ids(encoded)
        for i, start in prepared.plans:
            counts = self._conversation(rows[i]["messages"], ids, start)
            out[i] = counts if counts is not None else self._one(rows[i])
        for i in prepared.per_row:
            out[i] = self._one(rows[i])
        if prepared.texts_rows:
            self._texts(rows, prepared.texts_rows, out)
        return out  # type: ignore[return-value]  # every slot is filled

    def _renderings(self, messages: list[dict[str, str]]) -> list[str] | None:
        """[full, (prompt, turn) for each answer but the last, prompt of the last]; None = use the per-row path."""
        render = self._render
        try:
            texts = [render(messages, False)]  # type: ignore[misc]  # only called with a renderer
            last = len(messages) - 1
            for index, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                if index == 0:
                    return None  # an empty prompt: apply_chat_template refuses it its own way
                texts.append(render(messages[:index], True))  # type: ignore[misc]
                if index != last:
                    texts.append(render(messages[: index + 1], False))  # type: ignore[misc]
        except Exception:  # noqa: BLE001  # TemplateError (a refused row) or any surprise: per-row path decides
            return None
        return texts

    def _conversation(self, messages: list[dict[str, str]], ids: list[list[int]], start: int) -> SampleCounts | None:
        """``tokenize_conversation``'s counts from the batch's token ids; None when it would raise (or in doubt)."""
        full = ids[start]
        cursor = start + 1
        last = len(messages) - 1
        stops = self._stops
        spans: list[tuple[int, int]] = []  # (first trained position, its stop token's position) per answer
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = ids[cursor]
            cursor += 1
            if index == last:
                turn = full
            else:
                turn = ids[cursor]
                cursor += 1
                if full[: len(turn)] != turn:
                    return None
            begin = len(prompt)
            if turn[:begin] != prompt:
                return None
            end = len(turn)  # the first stop token at or after begin
            for stop in stops:
                try:
                    end = turn.index(stop, begin, end)
                except ValueError:
                    pass
            if end == len(turn):
                return None
            spans.append((begin, end))
        if not spans:
            return None
        budget = self.max_length
        if len(spans) == 1:
            begin, end = spans[0]
            trained = full[begin:min(end + 1, budget)]
            n_trainable = len(trained)
            trained_stops = sum(trained.count(stop) for stop in stops)
        else:  # labels are the union of every answer's span (a later span may overwrite an earlier one)
            positions = {p for begin, end in spans for p in range(begin, min(end + 1, budget))}
            n_trainable = len(positions)
            trained_stops = sum(full[p] in stops for p in positions)
        return SampleCounts(len(full), n_trainable, len(full) > budget, sum(end < budget for _, end in spans),
                            trained_stops)

    def _texts(self, rows: Sequence[dict[str, Any]], indices: list[int],
               out: list[SampleCounts | RowFormatError | None]) -> None:
        eos = self.tokenizer.eos_token_id
        if eos is None or IGNORE_INDEX == eos:
            for i in indices:
                out[i] = self._one(rows[i])
            return
        encoded = self.tokenizer([rows[i]["text"] for i in indices])["input_ids"]
        budget = self.max_length
        for i, input_ids in zip(indices, encoded, strict=True):
            length = len(input_ids) + (not input_ids or input_ids[-1] != eos)  # tokenize_text appends EOS
            kept = min(length, budget)  # labels[:budget]; labels[0] is never trained
            ids = input_ids if length == len(input_ids) else [*input_ids, eos]
            out[i] = SampleCounts(
                full_length=length,
                n_trainable=max(kept - 1, 0),
                truncated=length > budget,
                answers_in_budget=int(length - 1 < budget),
                trained_stops=sum(token == eos for token in ids[1:kept]),
            )
