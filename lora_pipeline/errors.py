"""Which failures are worth retrying: transient (network, a server's 5xx, a locked database) or permanent."""

from __future__ import annotations

import re

#: HTTP statuses a retry may get past: rate limiting and server-side errors.
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRANSIENT_MESSAGE = re.compile(r"database is locked|connection (reset|refused|aborted)|temporarily unavailable|"
                                r"timed? ?out|too many requests|service unavailable|bad gateway", re.IGNORECASE)


def _http_status(exc: BaseException) -> int | None:
    for attribute in ("get_http_status_code", "status_code", "status"):
        value = getattr(exc, attribute, None)
        value = value() if callable(value) else value
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether the same call may well succeed if tried again.

    Transient: connection and timeout errors, an HTTP 408/425/429/5xx from a server (MLflow, the hub),
    a locked database; anywhere in the exception's chain of causes. Everything else (bad data, a failed
    gate, a bug, a missing file, a 4xx) is permanent: retrying would only repeat it.
    """
    for error in _chain(exc):
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        status = _http_status(error)
        if status is not None:
            return status in _RETRYABLE_STATUS
        # requests' and SQLAlchemy's errors are not the builtin types: judged by name and message.
        if _TRANSIENT_MESSAGE.search(f"{type(error).__name__}: {error}"):
            return True
    return False
