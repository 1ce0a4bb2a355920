"""The derived-column table GX validates: one small numeric record per clean row, no text.

Columns are kept in typed arrays (about 40 bytes per row: int64 line and hash, int32 counts), so
profiling a million clean rows costs tens of MB while the texts stream straight to ``clean.jsonl``.
This is what lets the GX step see every clean row instead of a sample.
"""

from __future__ import annotations

from array import array
from typing import Any

from lora_pipeline.data.cleaning import roles_alternate
from lora_pipeline.formatting import TokenizedSample

#: Role codes stored per row; decoded to strings (pandas categoricals) for GX and Data Docs.
ROLE_NAMES = ("system", "user", "assistant", "other")
_ROLE_CODES = {name: code for code, name in enumerate(ROLE_NAMES)}
CHAT_COLUMNS = ("line", "n_turns", "prompt_chars", "answer_chars", "total_chars", "min_turn_chars",
                "first_role", "last_role", "roles_alternate", "content_hash")
TEXT_COLUMNS = ("line", "total_chars", "content_hash")
#: Added when the stage has a tokenizer: the templated, truncated training sample of each row.
TOKEN_COLUMNS = ("tokens", "trainable_tokens", "truncated", "answers_in_budget", "trained_eos")
#: Columns that are flags or identifiers, not lengths (left out of the length statistics).
_NOT_LENGTHS = ("line", "content_hash", "first_role", "last_role", "roles_alternate", "truncated",
                "answers_in_budget", "trained_eos")
#: Percentiles reported for each length column in report.json.
PERCENTILES = (50, 95)


def _role_code(role: str) -> int:
    return _ROLE_CODES.get(role, _ROLE_CODES["other"])


class Profile:
    """Accumulates the derived columns of the clean rows, in the order they were written."""

    def __init__(self, chat: bool, tokens: bool = False) -> None:
        self.chat = chat
        self.tokens = tokens
        self.columns = (CHAT_COLUMNS if chat else TEXT_COLUMNS) + (TOKEN_COLUMNS if tokens else ())
        typecodes = {"line": "q", "content_hash": "q", "first_role": "b", "last_role": "b", "roles_alternate": "b",
                     "truncated": "b"}
        self._data = {name: array(typecodes.get(name, "i")) for name in self.columns}

    def __len__(self) -> int:
        return len(self._data["line"])

    def add(self, line: int, row: dict[str, Any], content_hash: int, sample: TokenizedSample | None = None) -> None:
        """Record one clean row (``line``: its source line/row number; ``content_hash``: its fingerprint;
        ``sample``: its training sample, required when the profile has token columns)."""
        values: dict[str, int] = {"line": line, "content_hash": content_hash}
        if self.tokens:
            if sample is None:
                raise ValueError("a profile with token columns needs each row's sample")
            values.update(tokens=sample.full_length, trainable_tokens=sample.n_trainable,
                          truncated=int(sample.truncated), answers_in_budget=sample.answers_in_budget,
                          trained_eos=sample.trained_stops)
        if not self.chat:
            values["total_chars"] = len(row["text"])
        else:
            messages = row["messages"]
            lengths = [len(message["content"]) for message in messages]
            roles = [message["role"] for message in messages]
            # "prompt" = everything the final answer is conditioned on; "answer" = all assistant turns.
            values.update(
                n_turns=len(messages),
                prompt_chars=sum(lengths[:-1]),
                answer_chars=sum(n for n, role in zip(lengths, roles, strict=True) if role == "assistant"),
                total_chars=sum(lengths),
                min_turn_chars=min(lengths, default=0),
                first_role=_role_code(roles[0]) if roles else _role_code("other"),
                last_role=_role_code(roles[-1]) if roles else _role_code("other"),
                roles_alternate=int(roles_alternate(roles)),
            )
        for name in self.columns:
            self._data[name].append(values[name])

    def to_frame(self) -> Any:
        """The table as a pandas DataFrame (roles as strings, roles_alternate as bool)."""
        import numpy as np
        import pandas as pd

        frame: dict[str, Any] = {}
        for name in self.columns:
            values = np.frombuffer(self._data[name], dtype=self._data[name].typecode)
            if name in ("first_role", "last_role"):
                frame[name] = pd.Categorical.from_codes(values.astype(np.int8), categories=list(ROLE_NAMES))
            elif name in ("roles_alternate", "truncated"):
                frame[name] = values.astype(bool)
            else:
                frame[name] = values.copy()  # native int32/int64: no need to widen a million-row table
        return pd.DataFrame(frame, columns=list(self.columns))

    def token_summary(self) -> dict[str, float]:
        """Truncation and trainable-token totals ({} without token columns or rows)."""
        import numpy as np

        if not self.tokens or not len(self):
            return {}
        truncated = int(np.frombuffer(self._data["truncated"], dtype="b").sum())
        tokens = int(np.frombuffer(self._data["tokens"], dtype="i").sum())
        trainable = int(np.frombuffer(self._data["trainable_tokens"], dtype="i").sum())
        return {"n_truncated": truncated, "truncated_fraction": round(truncated / len(self), 6),
                "templated_tokens": tokens, "trainable_tokens": trainable}

    def length_stats(self) -> dict[str, dict[str, float]]:
        """min / mean / percentiles / max of each length column (empty dict when there are no rows)."""
        import numpy as np

        if not len(self):
            return {}
        stats = {}
        for name in self.columns:
            if name in _NOT_LENGTHS:
                continue
            values = np.frombuffer(self._data[name], dtype=self._data[name].typecode)
            stats[name] = {
                "min": int(values.min()),
                "mean": round(float(values.mean()), 2),
                **{f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES},
                "max": int(values.max()),
            }
        return stats
