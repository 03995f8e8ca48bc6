"""Running an entry point: expected failures as one line, unexpected ones with their traceback.

Every command-line entry point (``training.py``, ``eval.py``, ``chat.py``, the
``prepare_datasets`` CLIs, ``model.export`` and the converters) ends with
``run_cli(main, ConfigClass)``. A bad flag is argparse's usage error and a value a config
rejects is one error line (both exit 2). A failure the code expects (a missing or unreadable
file, a malformed dataset or checkpoint, a bad or conflicting value, a full disk) prints
``error: <what>: <file or flag>`` on stderr and exits 1, without a traceback from deep inside a
library; ``--debug`` (or ``LLMSEG_DEBUG=1``) keeps the traceback. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

from utils.checkpoint import CheckpointError
from utils.config import parse_config
from utils.logging_setup import setup_logging
from utils.text_files import DatasetFormatError

# What a user's input can cause (ValueError: a bad or conflicting value, found by our checks).
EXPECTED_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    DatasetFormatError,
    CheckpointError,
    ValueError,
)


def _message(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0] if len(text) < 2000 else text[:2000]


def run_cli(
    main: Callable,
    config_cls: type,
    argv: list[str] | None = None,
    extra_errors: tuple[type[BaseException], ...] = (),
    **parser_kwargs,
):
    """Parse ``argv`` into ``config_cls``, run ``main(config)`` and exit as described above.

    Args:
        extra_errors: further exception types this entry point expects (e.g. chat.py's
            ``KeyError`` for an image missing from a proposal store).
        parser_kwargs: passed to :func:`~utils.config.parse_config` (``aliases``).
    Returns:
        what ``main`` returned.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LLMSEG_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        config = parse_config(config_cls, argv, **parser_kwargs)
    except ValueError as error:  # a config's own check of a flag's value (__post_init__)
        if debug:
            raise
        sys.stderr.write(f"error: {_message(error)}\n")
        sys.exit(2)
    setup_logging()
    try:
        return main(config)
    except (*EXPECTED_ERRORS, *extra_errors) as error:
        if debug:
            raise
        sys.stderr.write(f"error: {_message(error)}\n")
        sys.exit(1)
    except OSError as error:
        if debug or error.errno != errno.ENOSPC:
            raise
        sys.stderr.write(f"error: no space left on the device: {error.filename or ''}\n")
        sys.exit(1)
