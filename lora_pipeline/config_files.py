"""Reading a config: a YAML file (read defensively), then ``a.b=c`` overrides, validated once into a
:class:`~lora_pipeline.config.PipelineConfig`. Every problem is a :class:`~lora_pipeline.config.ConfigError`
whose message names the file or key and the rule."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_pipeline.config import ConfigError, PipelineConfig


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into (["a", "b"], value); the value is parsed as YAML (ints, bools, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return key.strip().split("."), value


def _apply_override(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {'.'.join(keys[: depth + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(root)"
        message = err["msg"].removeprefix("Value error, ")
        shown_input = err["type"] != "missing" and not isinstance(err["input"], dict)
        # An input echoed back never shows a URI's password (e.g. a refused mlflow.tracking_uri).
        shown = re.sub(r"(://[^:/@\s]*:)[^/\s]+@", r"\1***@", repr(err["input"])) if shown_input else ""
        lines.append(f"  {key}: {message}" + (f" (got {shown})" if shown_input else ""))
    return "\n".join(lines)


#: A config file larger than this is refused unread: a config is a page of YAML, never megabytes.
MAX_CONFIG_BYTES = 1 << 20


def yaml_mapping_file(path: Path) -> Any:
    """Read a YAML config file defensively: size, encoding and nesting are checked, and every problem is one
    :class:`ConfigError` line naming the file and the rule (never a traceback, never unbounded memory)."""
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"config file {path} is empty (0 bytes): write the settings to change, or leave "
                          "--config out for the defaults")
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {size} bytes: a config file is at most {MAX_CONFIG_BYTES} bytes")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise ConfigError(f"config file {path} is binary (it holds NUL bytes), not YAML text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start}): save it as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests deeper than a config can: not a config file") from None


def load_config(path: Path | str | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load YAML (or defaults when ``path`` is None), apply ``a.b=c`` overrides and validate once.

    Raises:
        ConfigError: missing/unreadable file, bad YAML, unknown key, wrong type or contradiction; the
            message names the offending key.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        config_path = Path(path)
        if not config_path.is_file():
            raise ConfigError(f"config file not found: {config_path}")
        loaded = yaml_mapping_file(config_path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_path} must hold a mapping at the top level")
        tree = loaded or {}
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(tree, keys, value)
    try:
        config = PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        # from None: the message names every key and rule; pydantic's own error, chained, would print each raw
        # input (e.g. the password of a refused URI, half of it) in any traceback that logs this one.
        raise ConfigError(_format_errors(exc, source)) from None
    # Resolved once, here, so no later step writes relative to whatever the working directory is then.
    config.output_dir = config.output_dir.expanduser().resolve()
    return config
