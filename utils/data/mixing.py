"""Mixing dataset families by sampling rate, reproducibly across ranks, workers and resumes.

Training samples are a pure function of ``(seed, index)``: sample ``i`` seeds its own RNG, picks
a family with probability proportional to ``--sample_rates`` and lets the family draw a random
record. So every rank and DataLoader worker draws distinct samples (they are given distinct
indices), a rerun with the same seed sees the same data, and resuming at step ``n`` means starting
the index stream at ``n`` — no iterator state to save.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Protocol

from torch.utils.data import Dataset, Sampler

from utils.data.images import ImageReadError
from utils.data.samples import (
    EncodedSample,
    MissingProposalsError,
    SampleEncoder,
    SegmentationRecord,
)

logger = logging.getLogger(__name__)

MAX_DRAWS = 20


class RecordSource(Protocol):
    """A dataset family that can draw a random training record."""

    name: str

    def sample_record(self, rng: random.Random) -> SegmentationRecord: ...


def parse_mixture(datasets: str, sample_rates: str) -> list[tuple[str, float]]:
    """``"sem_seg||refer_seg", "9,3"`` -> ``[("sem_seg", 0.75), ("refer_seg", 0.25)]``."""
    names = [n for n in datasets.split("||") if n]
    try:
        rates = [float(r) for r in sample_rates.split(",") if r.strip()]
    except ValueError:
        raise ValueError(
            f"--sample_rates must be comma-separated numbers, got {sample_rates!r}: --sample_rates"
        ) from None
    if len(names) != len(rates):
        raise ValueError(
            f"--dataset lists {len(names)} families ({names}) but --sample_rates gives "
            f"{len(rates)} rates ({sample_rates!r})"
        )
    if any(r < 0 for r in rates) or sum(rates) <= 0:
        raise ValueError(f"--sample_rates must be non-negative with a positive sum: {sample_rates}")
    total = sum(rates)
    return [(name, rate / total) for name, rate in zip(names, rates)]


class MixedTrainingDataset(Dataset):
    """``length`` samples drawn from several families (index -> sample is deterministic).

    A drawn record that cannot be used is skipped, logged with its file, and another one is
    drawn from the same index's RNG: an unreadable or missing image, every conversation longer
    than ``model_max_length``, or an image with no proposals (nothing for the alignment loss to
    align). ``skipped`` counts the reasons in this process. Broken annotation files are not
    skipped: the loaders reject them when the dataset is built, before training starts.
    """

    def __init__(
        self,
        sources: list[tuple[RecordSource, float]],
        encoder: SampleEncoder,
        length: int,
        seed: int = 0,
    ):
        if not sources:
            raise ValueError("no training datasets were given")
        self.sources = [s for s, _ in sources]
        self.weights = [w for _, w in sources]
        self.encoder = encoder
        self.length = length
        self.seed = seed
        self.skipped: dict[str, int] = {}

    def __len__(self) -> int:
        return self.length

    def _skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        logger.warning("skipping a training sample (%s): %s", reason, detail)

    def __getitem__(self, index: int) -> EncodedSample:
        rng = random.Random(f"{self.seed}:{index}")
        for _ in range(MAX_DRAWS):
            source = rng.choices(self.sources, weights=self.weights)[0]
            record = source.sample_record(rng)
            try:
                sample = self.encoder(record)
            except ImageReadError as error:
                self._skip("unreadable image", str(error))
                continue
            except MissingProposalsError as error:
                self._skip("not in the proposal store", str(error))
                continue
            if sample is None:
                self._skip("too long", f"{record.image_path}: every conversation too long")
            elif record.proposals is not None and sample.proposal_masks.shape[0] == 0:
                self._skip("no proposals", f"{record.image_path} has no proposals")
            else:
                return sample
        raise RuntimeError(
            f"sample {index}: {MAX_DRAWS} draws in a row were unusable ({self.skipped}); "
            "check --model_max_length and the proposal store"
        )


class ResumableSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of a global stream, starting at ``start`` per rank.

    Args:
        length: samples per rank in the whole run.
        rank, world_size: this process's place in the job.
        start: how many samples this rank already consumed (restored on resume).
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.length = length
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def __iter__(self) -> Iterator[int]:
        for position in range(self.start, self.length):
            yield position * self.world_size + self.rank

    def __len__(self) -> int:
        return max(self.length - self.start, 0)


class EvaluationDataset(Dataset):
    """A fixed list of evaluation records, encoded on access."""

    def __init__(self, records: list[SegmentationRecord], encoder: SampleEncoder):
        self.records = records
        self.encoder = encoder
        self.skipped: list[str] = []  # files left out with --skip_missing (listed in metrics)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EncodedSample | SegmentationRecord:
        sample = self.encoder(self.records[index])
        # A record whose prompt does not fit is still scored (as an empty prediction).
        return sample if sample is not None else self.records[index]
