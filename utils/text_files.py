"""Reading the datasets' text and JSON files as they were released.

Not every released file is UTF-8: some of ReasonSeg's json files are cp1252 (Windows-1252), and
the upstream readers fall back to it. Every dataset reader here decodes through
:func:`read_dataset_text`: UTF-8 first (with or without a byte-order mark), then cp1252; a file
that is neither is a :class:`DatasetFormatError` naming it, never a ``UnicodeDecodeError`` from
deep inside a loader.

UTF-8 is tried first because cp1252 decodes almost any byte string: a UTF-8 file read as cp1252
would silently turn "café" into "cafÃ©". The reverse cannot happen for real text: cp1252 bytes of
non-ASCII letters are not valid UTF-8.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FALLBACK_ENCODING = "cp1252"


class DatasetFormatError(ValueError):
    """A dataset file that does not have the expected format; the message names it."""


def decode_dataset_bytes(data: bytes, source: str | os.PathLike) -> str:
    """``data`` decoded as UTF-8 (a leading byte-order mark dropped), else as cp1252.

    Raises:
        DatasetFormatError: neither decodes (``source`` names the file in the message).
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as utf8_error:
        try:
            return data.decode(FALLBACK_ENCODING)
        except UnicodeDecodeError:
            raise DatasetFormatError(
                f"{source}: neither UTF-8 nor {FALLBACK_ENCODING} text "
                f"(byte {utf8_error.start}: {data[utf8_error.start : utf8_error.start + 1]!r})"
            ) from None


def read_dataset_text(path: str | os.PathLike) -> str:
    """The text of a released dataset file (see :func:`decode_dataset_bytes`).

    Raises:
        FileNotFoundError: no such file.
        DatasetFormatError: unreadable, or neither UTF-8 nor cp1252.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as error:
        raise DatasetFormatError(f"{path}: unreadable ({error.strerror or error})") from None
    return decode_dataset_bytes(data, path)


def load_dataset_json(path: str | os.PathLike):
    """Parse a released JSON file (UTF-8 or cp1252).

    Raises:
        FileNotFoundError: no such file.
        DatasetFormatError: unreadable, not text, or not valid JSON (line and column given).
    """
    text = read_dataset_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path}: invalid JSON ({error})") from None
