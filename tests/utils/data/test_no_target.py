"""The start-up check: no-target training data needs the model's --rejection answer or token."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from utils.data.no_target import check_rejection_data, no_target_data

REPO = Path(__file__).resolve().parents[3]


def data_config(dataset_dir, **fields):
    values = dict(dataset_dir=dataset_dir, dataset="refer_seg||reason_seg", sample_rates="1,1",
                  refer_seg_data="refcoco", reason_seg_data="ReasonSeg|train",
                  false_premise_fraction=0.0, rejection="none")  # fmt: skip
    values.update(fields)
    return SimpleNamespace(**values)


@pytest.fixture
def reason_seg(tmp_path):
    """A train split of two jsons, one with a no-target extra query."""
    folder = tmp_path / "reason_seg" / "ReasonSeg" / "train"
    folder.mkdir(parents=True)
    plain = {"text": ["a box"], "is_sentence": False, "shapes": []}
    flagged = {**plain, "extra_queries": [{**plain, "text": ["a cat"], "no_target": True}]}
    (folder / "a.json").write_text(json.dumps(plain))
    (folder / "b.json").write_text(json.dumps(flagged))
    return tmp_path


def test_what_holds_no_target_rounds(reason_seg, tmp_path):
    config = data_config(reason_seg)
    assert no_target_data(config) == ["--reason_seg_data 'ReasonSeg|train' (1 no-target query)"]
    config = data_config(reason_seg, false_premise_fraction=0.1, refer_seg_data="refcoco||grefcoco")
    assert no_target_data(config)[:2] == [
        "--false_premise_fraction 0.1",
        "--refer_seg_data 'refcoco||grefcoco' (gRefCOCO)",
    ]
    # families drawn at rate 0 are not built, so their data does not count
    config = data_config(reason_seg, sample_rates="1,0", false_premise_fraction=0.1)
    assert no_target_data(config) == ["--false_premise_fraction 0.1"]
    config = data_config(reason_seg, sample_rates="0,1", false_premise_fraction=0.1)
    assert len(no_target_data(config)) == 1
    # an empty json without the flag is not a no-target query (issue 18's tolerated files)
    (reason_seg / "reason_seg/ReasonSeg/train/b.json").unlink()
    assert no_target_data(data_config(reason_seg)) == []


def test_check_stops_with_rejection_none_only(reason_seg):
    config = data_config(reason_seg, refer_seg_data="grefcoco")
    with pytest.raises(ValueError, match=r"need --rejection answer or token .*: --rejection$"):
        check_rejection_data(config)
    for mode in ("answer", "token"):
        check_rejection_data(data_config(reason_seg, refer_seg_data="grefcoco", rejection=mode))
    (reason_seg / "reason_seg/ReasonSeg/train/b.json").unlink()
    check_rejection_data(data_config(reason_seg))  # nothing without a target: no error
    with pytest.raises(ValueError, match="--false_premise_fraction must be in"):
        check_rejection_data(
            data_config(reason_seg, false_premise_fraction=-0.5, rejection="answer")
        )
    with pytest.raises(ValueError, match="--rejection must be one of"):
        check_rejection_data(data_config(reason_seg, rejection="maybe"))


def test_training_stops_at_start_up_with_one_line(tmp_path):
    """Before any model file is read: --version points nowhere and is never opened."""
    command = [sys.executable, "training.py", "--version", str(tmp_path / "no_model"),
               "--dataset_dir", str(tmp_path), "--dataset", "refer_seg", "--sample_rates", "1",
               "--false_premise_fraction", "0.3", "--log_base_dir", str(tmp_path / "runs"),
               "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --false_premise_fraction 0.3: trains no-target rounds")
    assert lines[-1].endswith(": --rejection")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # stopped before writing the run's config
