"""Convert ``masks.h5`` stores to upstream's ``masks.json`` (so both formats work).

For every split directory under ``--sam_masks_dir`` holding a ``masks.h5`` (or only those named
by ``--stores``), writes ``masks.json`` beside it in the schema upstream's ``SAM_Mask_Reader``
reads (documented in `utils.proposal_store`): a list of
``{"image", "target_size", "masks": [AMG records with COCO RLE "segmentation"]}``. Records are
streamed one image at a time (memory does not grow with the dataset) into a temporary file that
replaces ``masks.json`` only when complete. A ``masks.json`` already there (upstream's released
proposals, or an earlier conversion) is replaced only with ``--overwrite``: the command stops
first, naming every one.

    python -m prepare_datasets.convert_h5_to_json --sam_masks_dir ./dataset/sam_masks
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from utils.cli import run_cli
from utils.config import save_config
from utils.outputs import refuse_to_replace
from utils.proposal_store import H5_NAME, JSON_NAME, ImageProposals, ProposalReader

logger = logging.getLogger(__name__)


@dataclass
class ConvertConfig:
    """Convert masks.h5 stores to upstream's masks.json."""

    sam_masks_dir: str = field(default="./dataset/sam_masks", metadata={"help": "store root"})
    stores: str = field(
        default="",
        metadata={"help": "comma-separated store dirs relative to the root (default: all)"},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace masks.json files already beside the stores"}
    )


def amg_records(proposals: ImageProposals) -> list[dict]:
    """The proposals as SamAutomaticMaskGenerator ``coco_rle`` records (JSON-ready)."""
    height, width = int(proposals.height), int(proposals.width)
    return [
        {
            "segmentation": {"size": [height, width], "counts": counts.decode("ascii")},
            "area": int(proposals.area[i]),
            "bbox": [float(v) for v in proposals.bbox[i]],
            "predicted_iou": float(proposals.predicted_iou[i]),
            "point_coords": [[float(v) for v in proposals.point_coords[i]]],
            "stability_score": float(proposals.stability_score[i]),
            "crop_box": [0, 0, width, height],
        }
        for i, counts in enumerate(proposals.rle_counts)
    ]


def convert_store(h5_path: str | os.PathLike, json_path: str | os.PathLike | None = None) -> Path:
    """Write the json twin of one ``masks.h5``; returns its path."""
    h5_path = Path(h5_path)
    json_path = Path(json_path) if json_path else h5_path.with_name(JSON_NAME)
    tmp = json_path.with_name(f"{json_path.name}.tmp-{os.getpid()}")
    try:
        with ProposalReader(h5_path) as reader, open(tmp, "w") as out:
            out.write("[")
            for index, (name, proposals) in enumerate(reader.items()):
                record = {
                    "image": name,
                    "target_size": [int(proposals.height), int(proposals.width)],
                    "masks": amg_records(proposals),
                }
                out.write(("," if index else "") + json.dumps(record))
            out.write("]")
            if reader.failures:
                logger.warning(
                    "%s: %d failed images have no record in the json (listed in the h5)",
                    h5_path,
                    len(reader.failures),
                )
        os.replace(tmp, json_path)
    finally:
        tmp.unlink(missing_ok=True)
    return json_path


def find_stores(config: ConvertConfig) -> list[Path]:
    root = Path(config.sam_masks_dir)
    names = [s.strip() for s in config.stores.split(",") if s.strip()]
    if names:
        paths = [root / n / H5_NAME for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"no proposal store at {', '.join(missing)}")
        return paths
    return sorted(root.rglob(H5_NAME))


def main(config: ConvertConfig) -> list[Path]:
    stores = find_stores(config)
    if not stores:
        raise FileNotFoundError(f"no {H5_NAME} under {config.sam_masks_dir}")
    refuse_to_replace([store.with_name(JSON_NAME) for store in stores], config.overwrite)
    save_config(config, Path(config.sam_masks_dir) / "convert_config.json")
    written = []
    for store in stores:
        written.append(convert_store(store))
        logger.info("wrote %s", written[-1])
    return written


if __name__ == "__main__":
    run_cli(main, ConvertConfig)
