"""Precomputed image embeddings (the SAM head's frozen encoder pass), stored once, read by key.

An ``h5`` file with one dataset per image under ``embeddings/``, named by the SHA-1 of the image
file's bytes (so a moved or renamed dataset still finds its embeddings) and an ``encoder``
attribute: the fingerprint of the encoder weights and its input size. A store made by another
encoder is refused when it is opened, never read as if it matched.

Writing is resumable and never leaves a half-written store where a complete one is expected: the
writer appends to ``<path>.partial`` (images already there are skipped on a rerun) and renames it
to ``<path>`` when every image is in.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from utils.text_files import DatasetFormatError

STORE_FORMAT = "llm-seg-embeddings"
_GROUP = "embeddings"


def content_key(image_path: str | os.PathLike) -> str:
    """The store key of an image file: the SHA-1 of its bytes."""
    return hashlib.sha1(Path(image_path).read_bytes()).hexdigest()


def encoder_fingerprint(encoder: torch.nn.Module, input_size: int) -> dict:
    """What makes embeddings comparable: the input side and a digest of every weight value."""
    digest = hashlib.sha1()
    for name, value in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return {"input_size": int(input_size), "weights_sha1": digest.hexdigest()}


class EmbeddingStoreWriter:
    """Add embeddings to ``<path>.partial``; :meth:`finish` renames it to ``path``.

    Args:
        path: the store file to produce.
        encoder: :func:`encoder_fingerprint` of the encoder that makes the embeddings; a partial
            file of another encoder is an error (remove it or pick another ``path``).
        dtype: ``float16`` halves the file; ``float32`` keeps the encoder's values exactly.
    """

    def __init__(self, path: str | os.PathLike, encoder: dict, dtype: str = "float16") -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        try:
            self.file = h5py.File(self.partial, "a")
        except OSError as error:
            raise DatasetFormatError(
                f"{self.partial}: unreadable partial store ({error}); delete it to start over"
            ) from None
        recorded = self.file.attrs.get("encoder")
        if recorded is not None and json.loads(recorded) != encoder:
            self.file.close()
            raise ValueError(
                f"{self.partial}: started with another encoder; delete it or choose another --out"
            )
        self.file.attrs["format"] = STORE_FORMAT
        self.file.attrs["encoder"] = json.dumps(encoder, sort_keys=True)
        self.group = self.file.require_group(_GROUP)

    def __contains__(self, key: str) -> bool:
        return key in self.group

    def add(self, key: str, embedding: torch.Tensor) -> None:
        """Store one ``(C, g, g)`` embedding under ``key`` (a rerun's duplicates are skipped)."""
        if key in self.group:
            return
        self.group.create_dataset(
            key, data=embedding.detach().float().cpu().numpy().astype(self.dtype)
        )

    def flush(self) -> None:
        self.file.flush()

    def finish(self) -> Path:
        """Close the file and put it in place as ``path``."""
        self.file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing (the partial file stays, for a rerun to continue)."""
        if self.file.id.valid:
            self.file.close()


class EmbeddingStore:
    """Read-only access to a finished store; opened lazily in each process.

    Args:
        path: the store file.
        encoder: the fingerprint the reading model's encoder has; a store made by another
            encoder or for another input size is refused.
    """

    def __init__(self, path: str | os.PathLike, encoder: dict | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = (
                "; it is still being written (rerun its prepare command)"
                if partial.exists()
                else ""
            )
            raise FileNotFoundError(f"{self.path}: no embedding store{hint}")
        try:
            with h5py.File(self.path, "r") as file:
                if file.attrs.get("format") != STORE_FORMAT:
                    raise DatasetFormatError(f"{self.path}: not an embedding store")
                self.encoder = json.loads(file.attrs["encoder"])
                self._keys = set(file[_GROUP].keys())
        except (OSError, KeyError) as error:
            raise DatasetFormatError(
                f"{self.path}: truncated or corrupt embedding store ({error})"
            ) from None
        if encoder is not None and encoder != self.encoder:
            raise ValueError(
                f"{self.path}: made by another SAM encoder ({self.encoder}) than this model's "
                f"({encoder}); rebuild it with python -m prepare_datasets.prepare_sam_embeddings"
            )
        self._file: h5py.File | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def get(self, key: str) -> torch.Tensor | None:
        """The ``(C, g, g)`` fp32 embedding stored under ``key``, or ``None``."""
        if key not in self._keys:
            return None
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        try:
            return torch.from_numpy(self._file[_GROUP][key][()].astype(np.float32))
        except (OSError, KeyError) as error:
            raise DatasetFormatError(
                f"{self.path}: embedding {key} cannot be read ({error})"
            ) from None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, -1  # h5 handles do not cross processes
        return state
