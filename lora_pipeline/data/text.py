"""Text normalisation shared by the format normalisers, the cleaning rules and decontamination."""

from __future__ import annotations

import hashlib
import re
import unicodedata

# Any whitespace except the newline: tabs, NBSP, thin spaces, \f, \v ... (\r is turned into \n first).
_HORIZONTAL_RUN = re.compile(r"[^\S\n]+")
_LEADING_INDENT = re.compile(r"^[ \t]*")
_ANY_WHITESPACE_RUN = re.compile(r"\s+")
#: ASCII whitespace other than the space and the newline (str.isspace() is true for \x1c-\x1f too).
_ODD_ASCII_SPACE = re.compile(r"[\t\r\x0b\x0c\x1c-\x1f]")


def _canonical_ascii(text: str) -> bool:
    """True when ``text`` is ASCII and :func:`normalise_text` would return it unchanged (the common case).

    ASCII text is already NFC; what the general path changes is whitespace other than space and newline,
    two spaces in a row, a space before a newline, and whitespace at either end.
    """
    return (text.isascii() and not _ODD_ASCII_SPACE.search(text) and "  " not in text and " \n" not in text
            and text[:1] not in " \n" and text[-1:] not in " \n")


def normalise_text(text: str) -> str:
    """Canonical form of one text field: NFC, ``\\n`` newlines, collapsed inner whitespace, stripped ends.

    Inside each line runs of spaces/tabs (and other non-newline whitespace) become one space and
    trailing whitespace is removed; newlines are kept. A line's leading indentation is kept as is,
    because code and nested markdown lists mean something different without it. The text as a whole
    is stripped.

    Args:
        text: A raw text field.

    Returns:
        The normalised text (possibly empty).
    """
    if _canonical_ascii(text):
        return text  # already canonical: the general path below would return it unchanged
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = []
    for line in text.split("\n"):
        indent = _LEADING_INDENT.match(line).group(0)  # type: ignore[union-attr]  # always matches
        body = _HORIZONTAL_RUN.sub(" ", line[len(indent):]).rstrip()
        lines.append(indent + body if body else "")
    return "\n".join(lines).strip()


def matching_key(text: str) -> str:
    """A looser form for decontamination: normalised, case-folded, every whitespace run one space.

    Eval prompts are often re-typed or re-wrapped copies of training prompts, so contamination is
    matched on this key rather than on the exact text.
    """
    if _canonical_ascii(text) and "\n" not in text:
        return text.lower()  # single spaces only, nothing to strip; casefold() is lower() on ASCII
    return _ANY_WHITESPACE_RUN.sub(" ", normalise_text(text).casefold()).strip()


def fingerprint(text: str) -> int:
    """A signed 64-bit hash of ``text``.

    Sets of these stay small for millions of rows (8 bytes each, where keeping the texts could take GBs);
    the chance of one false collision among 10**6 rows is about 3e-8 (among 5 * 10**6, about 7e-7).
    """
    return fingerprint_bytes(text.encode("utf-8"))


def fingerprint_bytes(data: bytes) -> int:
    """:func:`fingerprint` of already encoded UTF-8 text."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)
