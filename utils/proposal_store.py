"""Proposal store: SAM "segment everything" masks of a dataset split, on disk and in memory.

`ImageProposals` is one image's proposals in memory; generators
(`prepare_datasets/proposals/generator.py`, `prepare_datasets/proposals/weightfree.py`) return it
and the readers below give it back.

On disk, a split directory under ``--sam_masks_dir`` (e.g. ``coco2014/``, ``ade20k/``,
``reason_seg/ReasonSeg/val/``) holds ``masks.h5`` (ours, written by the prepare scripts) and,
after ``prepare_datasets/convert_h5_to_json.py``, ``masks.json`` (upstream's format).
`ProposalReader` opens either.

``masks.h5`` layout (format ``llm-seg-proposals`` version 1; no pickles, no ``str``/``eval``):

    attrs: format, version, num_images, num_proposals, generator (JSON of the settings)
    images/name              (N,)    UTF-8 image keys, sorted by their UTF-8 bytes
    images/size              (N, 2)  int32 (height, width) of the masks (longest side <= 1024)
    images/offset            (N+1,)  int64: proposals of image i are rows offset[i]:offset[i+1]
    proposals/area           (P,)    int64
    proposals/bbox           (P, 4)  float32 x y w h
    proposals/predicted_iou  (P,)    float32
    proposals/stability_score (P,)   float32
    proposals/point_coords   (P, 2)  float32 x y
    proposals/rle_offset     (P+1,)  int64: RLE counts of proposal j are rle_bytes[o[j]:o[j+1]]
    proposals/rle_bytes      (B,)    uint8, concatenated COCO compressed RLE counts
    failures/name, failures/reason  (F,) UTF-8: images that could not be processed, and why

Readers load only the per-image index (names, sizes, offsets: a few bytes per image) and read
an image's rows on demand, so memory does not grow with the number of proposals. The file is
written to a temporary name and ``os.replace``-d, so it is always either the old or the new one.

``masks.json`` (upstream's schema, read by upstream's ``SAM_Mask_Reader``): one JSON list with a
record per image,
``{"image": key, "target_size": [H, W], "masks": [{"segmentation": {"size": [H, W], "counts":
str}, "area": int, "bbox": [x, y, w, h], "predicted_iou": float, "point_coords": [[x, y]],
"stability_score": float, "crop_box": [0, 0, W, H]}, ...]}``. JSON cannot be read lazily, so the
json reader holds the whole file in memory, as upstream does; prefer ``masks.h5``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from utils.masks import decode_rles, encode_rles, proposal_targets, proposal_weight_maps
from utils.text_files import DatasetFormatError

STORE_FORMAT = "llm-seg-proposals"
STORE_VERSION = 1
H5_NAME = "masks.h5"
JSON_NAME = "masks.json"
PROPOSAL_ORDERS = ("area", "predicted_iou")
_STRING = h5py.string_dtype("utf-8")
_PROPOSAL_FIELDS = {
    "area": (np.int64, ()),
    "bbox": (np.float32, (4,)),
    "predicted_iou": (np.float32, ()),
    "stability_score": (np.float32, ()),
    "point_coords": (np.float32, (2,)),
}


@dataclass
class ImageProposals:
    """SAM-everything proposals of one image, at the resolution they were generated (<=1024 side).

    Attributes:
        height, width: size of the masks (the image after shrinking its longest side to 1024).
        rle_counts: K COCO compressed RLE ``counts`` bytes, each of a ``(height, width)`` mask.
        area: ``(K,)`` int64 pixel counts.
        bbox: ``(K, 4)`` float32 boxes, x y w h.
        predicted_iou: ``(K,)`` float32 SAM predicted IoU.
        stability_score: ``(K,)`` float32 SAM stability score.
        point_coords: ``(K, 2)`` float32 x y of the prompt point that produced each mask.
    """

    height: int
    width: int
    rle_counts: list[bytes]
    area: np.ndarray
    bbox: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    point_coords: np.ndarray

    def __post_init__(self) -> None:
        num = len(self.rle_counts)
        self.area = np.asarray(self.area, dtype=np.int64).reshape(num)
        self.bbox = np.asarray(self.bbox, dtype=np.float32).reshape(num, 4)
        self.predicted_iou = np.asarray(self.predicted_iou, dtype=np.float32).reshape(num)
        self.stability_score = np.asarray(self.stability_score, dtype=np.float32).reshape(num)
        self.point_coords = np.asarray(self.point_coords, dtype=np.float32).reshape(num, 2)

    def __len__(self) -> int:
        return len(self.rle_counts)

    def rles(self, indices=None) -> list[dict]:
        """pycocotools RLE dicts ``{"size": [h, w], "counts": bytes}`` of the chosen proposals."""
        chosen = range(len(self)) if indices is None else np.asarray(indices).reshape(-1)
        size = [int(self.height), int(self.width)]
        return [{"size": size, "counts": self.rle_counts[int(i)]} for i in chosen]

    def decode(self, indices=None) -> np.ndarray:
        """Decode masks to a ``(K', height, width)`` bool array (all K, or ``indices`` in order)."""
        chosen = range(len(self)) if indices is None else np.asarray(indices).reshape(-1)
        return decode_rles([self.rle_counts[int(i)] for i in chosen], self.height, self.width)

    def select(self, indices) -> ImageProposals:
        """A new `ImageProposals` holding only ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ImageProposals(
            height=self.height,
            width=self.width,
            rle_counts=[self.rle_counts[int(i)] for i in idx],
            area=self.area[idx],
            bbox=self.bbox[idx],
            predicted_iou=self.predicted_iou[idx],
            stability_score=self.stability_score[idx],
            point_coords=self.point_coords[idx],
        )

    @classmethod
    def empty(cls, height: int, width: int) -> ImageProposals:
        """No proposals for an image of ``(height, width)``."""
        return cls.from_amg_records([], height, width)

    @classmethod
    def from_amg_records(cls, records: list[dict], height: int, width: int) -> ImageProposals:
        """Build from `SamAutomaticMaskGenerator` records (``binary_mask`` or ``coco_rle`` output).

        Each record has ``segmentation`` (an ``(H, W)`` bool array or a COCO RLE dict whose counts
        may be str or bytes), ``area``, ``bbox`` (xywh), ``predicted_iou``, ``stability_score`` and
        ``point_coords`` (``[[x, y]]``).
        """
        counts = []
        for index, record in enumerate(records):
            seg = record["segmentation"]
            if isinstance(seg, dict):
                if list(seg["size"]) != [height, width]:
                    raise ValueError(
                        f"record {index}: RLE size {seg['size']} != image size {[height, width]}"
                    )
                raw = seg["counts"]
                counts.append(raw.encode("ascii") if isinstance(raw, str) else bytes(raw))
            else:
                seg = np.asarray(seg, dtype=bool)
                if seg.shape != (height, width):
                    raise ValueError(
                        f"record {index}: mask shape {seg.shape} != image size {(height, width)}"
                    )
                counts.extend(encode_rles(seg[None]))
        num = len(records)
        return cls(
            height=int(height),
            width=int(width),
            rle_counts=counts,
            area=np.array([r["area"] for r in records], dtype=np.int64).reshape(num),
            bbox=np.array([r["bbox"] for r in records], dtype=np.float32).reshape(num, 4),
            predicted_iou=np.array([r["predicted_iou"] for r in records], dtype=np.float32),
            stability_score=np.array([r["stability_score"] for r in records], dtype=np.float32),
            point_coords=np.array(
                [np.asarray(r["point_coords"], dtype=np.float32).reshape(-1)[:2] for r in records],
                dtype=np.float32,
            ).reshape(num, 2),
        )


def name_sort_key(name: str) -> bytes:
    """The order of ``images/name`` (UTF-8 bytes, so on-disk binary search works)."""
    return name.encode("utf-8")


class H5StoreWriter:
    """Write a ``masks.h5`` image by image, in sorted name order; atomic on `close`.

    Usage::

        with H5StoreWriter(path, generator_settings) as writer:
            for name in sorted(names, key=name_sort_key):
                writer.add(name, proposals)
            writer.add_failure("broken.jpg", "zero bytes")

    Rows are buffered and appended in chunks; everything goes to ``<path>.tmp-<pid>`` which
    replaces ``path`` only when `close` succeeds (an exception leaves the old file untouched).
    """

    def __init__(self, path: str | os.PathLike, generator: dict | None = None, flush_every=256):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.file = h5py.File(self.tmp_path, "w")
        self.file.attrs["format"] = STORE_FORMAT
        self.file.attrs["version"] = STORE_VERSION
        self.file.attrs["generator"] = json.dumps(generator or {}, sort_keys=True)
        props = self.file.create_group("proposals")
        for field, (dtype, shape) in _PROPOSAL_FIELDS.items():
            props.create_dataset(
                field, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=True
            )
        props.create_dataset(
            "rle_bytes", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(1 << 16,)
        )
        # Per-proposal offsets are streamed too (COCO has ~10^7 proposals).
        props.create_dataset(
            "rle_offset", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(1 << 14,)
        )
        self.flush_every = flush_every
        self.names: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.offsets = [0]
        self._rle_end = 0
        self.failures: list[tuple[str, str]] = []
        self._pending: list[ImageProposals] = []

    def add(self, name: str, proposals: ImageProposals) -> None:
        """Append one image; names must arrive in strictly increasing `name_sort_key` order."""
        if self.names and name_sort_key(name) <= name_sort_key(self.names[-1]):
            raise ValueError(f"image {name!r} is out of order or repeated after {self.names[-1]!r}")
        self.names.append(name)
        self.sizes.append((int(proposals.height), int(proposals.width)))
        self.offsets.append(self.offsets[-1] + len(proposals))
        self._pending.append(proposals)
        if len(self._pending) >= self.flush_every:
            self._flush()

    def add_failure(self, name: str, reason: str) -> None:
        """Record an image that has no proposals because it could not be processed."""
        self.failures.append((name, reason))

    def _append(self, dataset: h5py.Dataset, values: np.ndarray) -> None:
        start = dataset.shape[0]
        dataset.resize(start + len(values), axis=0)
        dataset[start:] = values

    def _flush(self) -> None:
        if not self._pending:
            return
        props = self.file["proposals"]
        for field in _PROPOSAL_FIELDS:
            self._append(props[field], np.concatenate([getattr(p, field) for p in self._pending]))
        lengths = np.array([len(c) for p in self._pending for c in p.rle_counts], dtype=np.int64)
        self._append(props["rle_offset"], self._rle_end + np.cumsum(lengths))
        self._rle_end += int(lengths.sum())
        blob = b"".join(c for p in self._pending for c in p.rle_counts)
        self._append(props["rle_bytes"], np.frombuffer(blob, dtype=np.uint8))
        self._pending = []

    def close(self) -> Path:
        """Write the index, then atomically move the file into place; returns its path."""
        self._flush()
        images = self.file.create_group("images")
        images.create_dataset("name", data=np.array(self.names, dtype=object), dtype=_STRING)
        images.create_dataset("size", data=np.array(self.sizes, dtype=np.int32).reshape(-1, 2))
        images.create_dataset("offset", data=np.array(self.offsets, dtype=np.int64))
        failures = self.file.create_group("failures")
        failures.create_dataset(
            "name", data=np.array([n for n, _ in self.failures], dtype=object), dtype=_STRING
        )
        failures.create_dataset(
            "reason", data=np.array([r for _, r in self.failures], dtype=object), dtype=_STRING
        )
        self.file.attrs["num_images"] = len(self.names)
        self.file.attrs["num_proposals"] = self.offsets[-1]
        self.file.close()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Discard the temporary file."""
        self.file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> H5StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def resolve_store_path(path: str | os.PathLike) -> Path:
    """The store file of a file or split directory (``masks.h5`` preferred to ``masks.json``)."""
    path = Path(path)
    if path.is_dir():
        for name in (H5_NAME, JSON_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no {H5_NAME} or {JSON_NAME}; run the prepare script")
    if not path.is_file():
        raise FileNotFoundError(f"proposal store {path} does not exist")
    return path


class ProposalReader:
    """Read-only access to one split's proposals, from ``masks.h5`` or upstream's ``masks.json``.

    The h5 file is opened lazily and reopened in each process (safe with forked DataLoader
    workers); only the per-image index is held in memory.

    Args:
        path: a ``masks.h5``/``masks.json`` file or a split directory holding one.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_store_path(path)
        self.is_json = self.path.suffix == ".json"
        self._file: h5py.File | None = None
        self._pid = -1
        if self.is_json:
            self._load_json()
        else:
            try:
                self._read_h5_index()
            except (OSError, KeyError) as error:  # h5py: truncated file, missing dataset
                raise DatasetFormatError(
                    f"{self.path}: truncated or corrupt proposal store ({error}); "
                    "rerun its prepare script"
                ) from None

    def _read_h5_index(self) -> None:
        with h5py.File(self.path, "r") as file:
            if file.attrs.get("format") != STORE_FORMAT:
                raise ValueError(
                    f"{self.path}: not an llm-seg proposal store (upstream str "
                    "h5 files are not supported; convert them to masks.json)"
                )
            names = file["images/name"].asstr()[()]
            self._names = np.array([name_sort_key(n) for n in names], dtype=bytes)
            self._sizes = file["images/size"][()]
            self._offsets = file["images/offset"][()]
            self.failures = dict(
                zip(file["failures/name"].asstr()[()], file["failures/reason"].asstr()[()])
            )
            self.generator = json.loads(file.attrs["generator"])

    def _load_json(self) -> None:
        with open(self.path) as handle:
            try:
                records = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.path}: not valid JSON ({error})") from None
        self._records = {}
        for index, record in enumerate(records):
            try:
                self._records[record["image"]] = record
            except (KeyError, TypeError):
                raise ValueError(f"{self.path}: record {index} has no 'image' field") from None
        self.failures = {}
        self.generator = {}

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __len__(self) -> int:
        return len(self._records) if self.is_json else len(self._names)

    def names(self) -> list[str]:
        """All image keys (sorted for h5, file order for json)."""
        if self.is_json:
            return list(self._records)
        return [n.decode("utf-8") for n in self._names]

    def _row(self, name: str) -> int:
        key = name_sort_key(name)
        row = int(np.searchsorted(self._names, key))
        if row < len(self._names) and self._names[row] == key:
            return row
        return -1

    def __contains__(self, name: str) -> bool:
        return name in self._records if self.is_json else self._row(name) >= 0

    def get(self, name: str) -> ImageProposals:
        """Proposals of image ``name`` (the key the prepare script stored, e.g. the file name).

        Raises ``KeyError`` naming the store, and the failure reason if the image failed.
        """
        if self.is_json:
            record = self._records.get(name)
            if record is None:
                raise KeyError(self._missing_message(name))
            height, width = record["target_size"]
            return ImageProposals.from_amg_records(record["masks"], height, width)
        row = self._row(name)
        if row < 0:
            raise KeyError(self._missing_message(name))
        start, stop = int(self._offsets[row]), int(self._offsets[row + 1])
        height, width = (int(v) for v in self._sizes[row])
        if start == stop:
            return ImageProposals.empty(height, width)
        try:
            props = self._h5()["proposals"]
            fields = {field: props[field][start:stop] for field in _PROPOSAL_FIELDS}
            rle_offsets = props["rle_offset"][start : stop + 1]
            blob = props["rle_bytes"][rle_offsets[0] : rle_offsets[-1]].tobytes()
        except (OSError, KeyError) as error:  # a damaged chunk inside an openable file
            raise DatasetFormatError(
                f"{self.path}: image {name!r}: its proposals cannot be read ({error})"
            ) from None
        local = rle_offsets - rle_offsets[0]
        counts = [blob[a:b] for a, b in zip(local[:-1], local[1:])]
        return ImageProposals(height=height, width=width, rle_counts=counts, **fields)

    def num_proposals(self, name: str) -> int:
        """How many proposals image ``name`` has, from the index only (no mask is decoded).

        Raises ``KeyError`` like :meth:`get` when the image is not in the store.
        """
        if self.is_json:
            record = self._records.get(name)
            if record is None:
                raise KeyError(self._missing_message(name))
            return len(record.get("masks") or [])
        row = self._row(name)
        if row < 0:
            raise KeyError(self._missing_message(name))
        return int(self._offsets[row + 1] - self._offsets[row])

    def _missing_message(self, name: str) -> str:
        if name in self.failures:
            return f"{self.path}: image {name!r} failed during preparation: {self.failures[name]}"
        return f"{self.path}: no proposals for image {name!r} ({len(self)} images in the store)"

    def items(self) -> Iterator[tuple[str, ImageProposals]]:
        """``(name, proposals)`` for every image, in store order."""
        for name in self.names():
            yield name, self.get(name)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ProposalReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # An open h5py handle cannot be pickled (spawned DataLoader workers); reopen lazily.
        state = dict(self.__dict__)
        state["_file"] = None
        return state


def top_k_indices(proposals: ImageProposals, top_k: int = 50, order: str = "area") -> np.ndarray:
    """Rows of the ``top_k`` proposals, largest first by ``order`` (``area`` as upstream, or
    ``predicted_iou``); ties keep store order. Returns ``(min(K, top_k),)`` int64."""
    if order not in PROPOSAL_ORDERS:
        raise ValueError(f"unknown proposal order {order!r}; expected one of {PROPOSAL_ORDERS}")
    key = proposals.area if order == "area" else proposals.predicted_iou
    return np.argsort(-key.astype(np.float64), kind="stable")[:top_k].astype(np.int64)


@dataclass
class ProposalSample:
    """One image's proposals as the model consumes them, plus their targets.

    Attributes:
        weight_maps: ``(K, size, size)`` float32 soft masks (padded to square, bilinear-resized).
        masks: ``(K, h, w)`` bool proposals at the store resolution (for evaluation).
        iou: ``(R, K)`` float32 IoU of each proposal with each of the R ground-truth masks.
        iop: ``(R, K)`` float32 intersection over proposal area.
        indices: ``(K,)`` int64 rows of the chosen proposals in the stored `ImageProposals`.
        bbox: ``(K, 4)`` float32 x y w h at the store resolution.
    """

    weight_maps: torch.Tensor
    masks: torch.Tensor
    iou: torch.Tensor
    iop: torch.Tensor
    indices: np.ndarray
    bbox: torch.Tensor


def build_proposal_sample(
    proposals: ImageProposals,
    ground_truth: np.ndarray | torch.Tensor | None = None,
    top_k: int = 50,
    order: str = "area",
    size: int = 256,
    antialias: bool = True,
) -> ProposalSample:
    """Select the top-K proposals of an image and compute weight maps and IoU/IoP targets.

    Args:
        proposals: the image's stored proposals.
        ground_truth: ``(R, H, W)`` masks at the original image resolution, bool or {0, 1, 255}
            (255 = ignore, counted as background); ``None`` gives ``(0, K)`` targets.
        top_k, order: see `top_k_indices` (upstream: 50 by area).
        size, antialias: see `utils.masks.proposal_weight_maps`.

    An image without proposals yields K = 0 tensors; callers decide how to handle it.
    """
    indices = top_k_indices(proposals, top_k, order)
    masks = torch.from_numpy(proposals.decode(indices))
    if ground_truth is None:
        iou = iop = torch.zeros((0, len(indices)), dtype=torch.float32)
    else:
        iou, iop = proposal_targets(masks, ground_truth)
    return ProposalSample(
        weight_maps=proposal_weight_maps(masks, size=size, antialias=antialias),
        masks=masks,
        iou=iou,
        iop=iop,
        indices=indices,
        bbox=torch.from_numpy(proposals.bbox[indices]),
    )
