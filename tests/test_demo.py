"""The built-in demo end to end: a fast variant of ``bash scripts/demo.sh`` must learn.

Same chain as the full demo (generate -> weight-free proposals -> tiny checkpoints -> training.py
-> eval.py -> report), with a few dozen images and a hundred-odd steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prepare_datasets.synthetic.queries import QUERY_TYPES

REPO = Path(__file__).resolve().parents[1]
FAST = {
    "DEMO_NUM_TRAIN": "60",
    "DEMO_NUM_VAL": "30",
    "DEMO_EPOCHS": "1",
    "DEMO_STEPS_PER_EPOCH": "250",
    "DEMO_BATCH_SIZE": "4",
    "DEMO_WARMUP_STEPS": "25",
}


def test_fast_demo_learns_and_writes_its_outputs(tmp_path):
    out_dir = tmp_path / "demo out"  # a space in the path must not break the script
    # In-process training tests leave this process's rendezvous variables (and its listening
    # store) behind; the demo's own training must choose its own.
    rendezvous = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **FAST)
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh"), str(out_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 30
    assert metrics["selection"] == "argmax"
    assert 0 < metrics["chance_giou"] < metrics["oracle_giou"] <= 1
    assert set(metrics["per_query_type"]) == set(QUERY_TYPES)
    assert sum(t["num_images"] for t in metrics["per_query_type"].values()) == 30
    # It learns: clearly better than picking a proposal at random.
    assert metrics["giou"] >= 2 * metrics["chance_giou"], metrics
    assert set(metrics["stage_seconds"]) == {"generate", "proposals", "model", "train", "evaluate"}

    # Training pictures carry further queries about other objects (asked together in a step);
    # the val split is scored on its main query only.
    split_dir = out_dir / "dataset" / "reason_seg" / "ReasonSeg"
    records = [json.loads(p.read_text()) for p in sorted((split_dir / "train").glob("*.json"))]
    extras = [extra for record in records for extra in record.get("extra_queries", [])]
    assert len(records) < len(extras) <= 3 * len(records)
    assert all({"text", "is_sentence", "shapes"} <= set(extra) for extra in extras)

    pictures = sorted((out_dir / "vis").glob("*.png"))
    assert len(pictures) == 30
    assert pictures[0].stat().st_size > 1000
    assert list((out_dir / "train").glob("events.out.tfevents.*"))
    assert "chance" in result.stdout
    assert str(out_dir / "vis") in result.stdout

    # The trained model is exported, and the web demo serves it as the README says.
    assert (out_dir / "export" / "export_config.json").is_file()
    assert f"python app.py --model_dir {out_dir / 'export'}" in result.stdout
    serve_the_export(out_dir, tmp_path)


def serve_the_export(out_dir: Path, tmp_path: Path) -> None:
    """``python app.py --model_dir OUT/export`` (its defaults) answers a round on a val picture."""
    import app
    from tests.test_app import ask, free_port

    client_module = pytest.importorskip("gradio_client")
    picture = sorted((out_dir / "dataset" / "reason_seg" / "ReasonSeg" / "val").glob("*.jpg"))[0]
    config = app.AppConfig(model_dir=str(out_dir / "export"), port=free_port(),
                           out_dir=str(tmp_path / "app"))  # fmt: skip
    page, url = app.main(config, block=False)
    try:
        client = client_module.Client(url, verbose=False)
        overlay, _, answer, _, gallery, _, status = ask(client, picture, "the largest object")
        assert Path(overlay).is_file()
        assert answer
        assert [entry["caption"] for entry in gallery] == ["round 1: the largest object"]
        assert "Round 1 answered" in status
    finally:
        page.close()
