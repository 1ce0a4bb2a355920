"""Secret values this process knows of, and the one place that removes them from text and log records.

Secrets (a hub token, MLflow credentials, a database URL) reach a run from its environment: the worker's,
or Prefect Secret blocks the flow loads into it (``secrets.env`` in the config names the blocks, never
the values). Every value that arrives that way is registered here, and from then on:

- :func:`redact` replaces it in any text; :func:`mask_secrets` also removes what looks like a credential
  (URI passwords, secret query parameters, hub and bearer tokens) and is what the summary's error,
  notices, MLflow params, tags and descriptions go through;
- :func:`install_log_redaction` makes every log record of the process (Prefect's logs shipped to its API,
  MLflow's, ours) carry the redacted message.

The environment variables in :data:`SECRET_ENV_VARS` are registered on installation too.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping

MASK = "***"
#: Environment variables that hold credentials for the services this pipeline talks to.
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                   "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PREFECT_API_KEY", "DATABASE_URL",
                   "LORA_PIPELINE_POSTGRES_URL")
#: Shorter values are not redacted: replacing "1" or "abc" everywhere would garble every text.
MIN_SECRET_LENGTH = 6

_known: set[str] = set()
_lock = threading.Lock()
_installed = False


def register_secret(value: str | None) -> None:
    """Redact ``value`` from now on (values shorter than :data:`MIN_SECRET_LENGTH` are ignored)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        with _lock:
            _known.add(value)


def register_environment(environ: Mapping[str, str] | None = None) -> None:
    """Register the values of :data:`SECRET_ENV_VARS` present in ``environ`` (default: this process's)."""
    environ = os.environ if environ is None else environ
    for name in SECRET_ENV_VARS:
        register_secret(environ.get(name))


def redact(text: str) -> str:
    """``text`` with every registered secret value replaced by ``***`` (longest first: no partial leftovers)."""
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, MASK)
    return text


def install_log_redaction() -> None:
    """Redact registered secrets from every log record created in this process from now on (idempotent).

    A log record factory, not a handler filter: it covers every logger and every handler (Prefect's API
    log handler included), also those added later.
    """
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    register_environment()
    make_record = logging.getLogRecordFactory()

    def redacting_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if _known:
            message = record.getMessage()
            cleaned = redact(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
            if record.exc_info and not record.exc_text:  # the traceback, formatted once, redacted
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(redacting_record)


def forget_secrets() -> None:
    """Forget every registered value (tests)."""
    with _lock:
        _known.clear()


# scheme://user:password@host -> scheme://user:***@host. Up to the last '@' before any '/', so a
# raw '@' in the password is masked too, while "host:8080/a@b" (a port, then a path) is left alone.
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)[^/\s]+@")
# ?token=... / &api_key=... / &client_secret=... / &sig=... (Azure SAS) in any URL or free text.
_SECRET_QUERY = re.compile(
    r"(?P<head>[?&;][\w.\-]*(?:token|password|passwd|pwd|secret|api[_\-]?key|sig|signature)=)[^&#\s]+",
    re.IGNORECASE,
)
# Hugging Face user/org tokens and "Authorization: Bearer ..." values.
_HF_TOKEN = re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{10,}\b")
_BEARER = re.compile(r"(?P<head>\bBearer\s+)[A-Za-z0-9._~+/\-]+=*", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """Replace credentials in free text: URI passwords, secret query params, HF and bearer tokens.

    Args:
        text: Any string that may be logged or stored (URIs, error messages, tag values).

    Returns:
        The text with each secret replaced by ``***``; everything else unchanged.
    """
    text = redact(text)  # values known to be secret (environment, Prefect Secret blocks)
    text = _URI_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    text = _SECRET_QUERY.sub(rf"\g<head>{MASK}", text)
    text = _BEARER.sub(rf"\g<head>{MASK}", text)
    return _HF_TOKEN.sub(MASK, text)


def _masked(value: object) -> object:
    if isinstance(value, str):
        return mask_secrets(value)
    if type(value) in (list, tuple) and any(isinstance(item, str) for item in value):  # type: ignore[arg-type]
        return type(value)(mask_secrets(item) if isinstance(item, str) else item for item in value)  # type: ignore
    return value


def redact_exception(exc: BaseException) -> BaseException:
    """Remove secrets from an exception and the exceptions it chains to, in place; returns ``exc``.

    Prefect makes a failed task's state message from ``str(exc)`` and may persist the exception as the
    task's result: both happen after the task body raised, where no log record is involved. So the
    exception itself is cleaned (same object, type and traceback): its string arguments, its string
    attributes (``MlflowException.message``, ``OSError.filename``, ``CalledProcessError.cmd``) and notes,
    along ``__cause__`` and ``__context__``.
    """
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        try:
            current.args = tuple(_masked(arg) for arg in current.args)
            attributes = dict(vars(current))
            if isinstance(current, OSError):  # C-level attributes, not in __dict__
                attributes.update(strerror=current.strerror, filename=current.filename, filename2=current.filename2)
            for name, value in attributes.items():
                masked = _masked(value)
                if masked != value:
                    setattr(current, name, masked)
        except Exception:  # noqa: BLE001 - an exotic exception stays as it is rather than replace the real one
            pass
        pending += [current.__cause__, current.__context__]
    return exc
