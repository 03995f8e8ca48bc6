"""Evaluate LLM-Seg on ReasonSeg val/test (or another set), or score any method's mask PNGs.

Model evaluation (one device, no launcher needed; several processes under torchrun/deepspeed)::

    python eval.py --version LLaVA-folder --vision-tower clip --dinov2 dinov2 \\
        --checkpoint runs/llmseg --dataset_dir dataset --sam_masks_dir sam_masks \\
        --val_dataset "ReasonSeg|test" --selection iop --out_dir eval_out

Scoring other methods' predictions with the same metric code::

    python eval.py --pred_dir preds/ --dataset_dir dataset --val_dataset "ReasonSeg|val" \\
        --out_json scores.json

Writes ``metrics.json`` (gIoU, cIoU, ncIoU, per group: ReasonSeg ``short``/``long``) and a
per-image CSV. On gRefCOCO (``--val_dataset "grefcoco|unc|val"``) ``--pred_dir`` reads one
``<sent_id>.png`` per sentence (all zero or missing = "no target") and writes gRefCOCO's gIoU,
cIoU, N-acc and T-acc (:mod:`utils.grefcoco_scoring`); a model's evaluation adds them under
``grefcoco`` in ``metrics.json``. ``--mode free`` lets the model write its own answers instead of
the fixed ``[SEG].`` (:mod:`model.free_evaluation`): every ``[SEG]`` it writes is a mask, an
answer without one a rejection.

``metrics.json``, ``per_image.csv``, ``vis/`` (or ``--out_json`` and its ``.csv``) are replaced
only when an earlier ``eval.py`` run wrote them (its ``eval_config.json`` beside them) or with
``--overwrite``: a rerun into its own folder needs no flag.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

from model.builder import CONFIG_ALIASES, LLMSegConfig, build_llm_seg, setup_trainable
from model.evaluation import SelectionSettings, evaluate, score_prediction_folder
from model.export import load_exported
from model.free_evaluation import GenerationSettings, evaluate_free
from utils.cli import run_cli
from utils.config import save_config
from utils.data.builders import (
    DataConfig,
    build_encoder,
    build_eval_dataset,
    check_val_dataset,
    eval_records,
)
from utils.data.grefcoco import GREFCOCO, load_grefcoco_split, parse_grefcoco_spec
from utils.data.mrseg import load_mrseg, mrseg_report
from utils.device import resolve_device, resolve_dtype
from utils.distributed import init_process_group, is_main_process, launched_as_group
from utils.grefcoco_scoring import score_grefcoco_predictions
from utils.legacy_tokenizer import resolve_tokenization
from utils.logging_setup import setup_logging
from utils.outputs import refuse_to_replace
from utils.prediction_png import PredictionReading
from utils.round_scoring import score_multi_round_predictions
from utils.run_checkpoints import load_trainable_weights

logger = logging.getLogger("eval")

EVAL_MODES = ("teacher_forced", "free")
MULTI_ROUND_SETS = ("mrseg", "reasonsegmr")  # --val_dataset families of several rounds


@dataclass
class EvalConfig(LLMSegConfig, DataConfig):
    """Evaluate an LLM-Seg checkpoint, or score a folder of predicted masks."""

    checkpoint: str = field(
        default="", metadata={"help": "training run / ckpt_model / global_step folder"}
    )
    model_dir: str = field(
        default="", metadata={"help": "an export folder (python -m model.export) instead"}
    )
    checkpoint_tag: str = field(
        default="best", metadata={"help": "which save of a run", "choices": ["best", "latest"]}
    )
    out_dir: str = field(default="./eval_out", metadata={"help": "where results are written"})
    selection: str = field(
        default="iop",
        metadata={"help": "mask selection", "choices": ["argmax", "iop", "hybrid", "topk_iop"]},
    )
    iop_threshold: float = field(default=0.5, metadata={"help": "IoP threshold of selection"})
    selection_top_k: int = field(default=5, metadata={"help": "top-k of topk_iop selection"})
    visualize: bool = field(default=False, metadata={"help": "write an overlay per image"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    pred_dir: str = field(
        default="", metadata={"help": "score <stem>.png masks from this folder instead"}
    )
    out_json: str = field(default="", metadata={"help": "--pred_dir mode: where the JSON goes"})
    pred_threshold: float = field(
        default=-1.0,
        metadata={"help": "--pred_dir: read soft masks, foreground above T x the maximum "
                  "(default: a PNG with more than two values is an error)"},
    )  # fmt: skip
    resize_preds: bool = field(
        default=False,
        metadata={"help": "--pred_dir: resize PNGs of another size to their image (nearest; "
                  "default: an error)"},
    )  # fmt: skip
    mode: str = field(
        default="teacher_forced",
        metadata={"help": "teacher_forced (the answer fixed to '[SEG].', upstream's protocol) or "
                  "free (the model writes its answer greedily; every [SEG] in it is a mask, "
                  "their union the query's, none a rejection: an empty mask). free scores "
                  "single-round sets only (ReasonSeg, the refer sets, gRefCOCO, LLM-Seg40K); "
                  "MRSeg and ReasonSegMR are refused"},
    )  # fmt: skip
    max_new_tokens: int = field(
        default=32, metadata={"help": "--mode free: the longest answer, in tokens"}
    )
    generation_batch_size: int = field(
        default=8, metadata={"help": "--mode free: answers written per forward"}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace results in --out_dir (or --out_json) that eval.py did not "
                  "write (default: stop, naming them; an earlier eval.py run's are replaced)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        # Checked here, not by argparse's choices, so a bad value is one error line (exit 2).
        if self.mode not in EVAL_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {EVAL_MODES}: --mode")
        for name in ("max_new_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"must be at least 1, got {getattr(self, name)}: --{name}")
        if self.mode != "free":
            return
        if self.pred_dir:
            raise ValueError("--pred_dir scores saved masks, free generation needs a model: --mode")
        if self.val_dataset.split("|")[0].lower() in MULTI_ROUND_SETS:
            raise ValueError(
                f"free generation scores single-round sets; {self.val_dataset} is multi-round "
                "(evaluate it teacher-forced): --mode"
            )
        if self.history != "gt":
            raise ValueError(
                "--history chooses the references of multi-round sets, which free generation "
                f"does not score: --history {self.history} with --mode"
            )


def _reading(config: EvalConfig) -> PredictionReading:
    threshold = config.pred_threshold if config.pred_threshold >= 0 else None
    return PredictionReading(threshold=threshold, resize=config.resize_preds)


def _refuse_foreign_results(config: EvalConfig) -> None:
    """Stop before writing when a result file ``config``'s run would replace was not written by
    an earlier eval.py run (recognised by its ``eval_config.json``), unless ``--overwrite``."""
    if config.pred_dir:
        out_json = Path(config.out_json or Path(config.out_dir) / "metrics.json")
        marker = out_json.with_name("eval_config.json")
        paths = [out_json, out_json.with_suffix(".csv")]
        if config.val_dataset.lower().startswith("mrseg|"):
            paths.append(out_json.with_name(out_json.stem + "_per_mask.csv"))
        flag = "--out_json" if config.out_json else "--out_dir"
    else:
        out_dir = Path(config.out_dir)
        marker = out_dir / "eval_config.json"
        paths = [out_dir / "metrics.json", out_dir / "per_image.csv"]
        paths += [out_dir / "vis"] if config.visualize else []
        flag = "--out_dir"
    refuse_to_replace([*paths, marker], config.overwrite, "eval.py", flag, marker, EvalConfig)


def main(config: EvalConfig) -> dict:
    """Run the evaluation ``config`` describes and return its metrics."""
    setup_logging()
    check_val_dataset(config.val_dataset)
    _refuse_foreign_results(config)
    if config.pred_dir:
        out_json = Path(config.out_json or Path(config.out_dir) / "metrics.json")
        save_config(config, out_json.with_name("eval_config.json"))
        if config.val_dataset.lower().startswith("mrseg|"):  # multi-round: per-round folders
            stem = config.val_dataset.split("|", 1)[1]
            records = load_mrseg(config.dataset_dir, stem, None, strict=True)
            report = mrseg_report(config.dataset_dir, stem)
            return score_multi_round_predictions(
                records, config.pred_dir, out_json, report, _reading(config)
            )
        if config.val_dataset.split("|")[0].lower() == GREFCOCO:  # one PNG per sentence
            split_by, split = parse_grefcoco_spec(config.val_dataset)
            images = load_grefcoco_split(config.dataset_dir, None, split, split_by, strict=True)
            return score_grefcoco_predictions(images, config.pred_dir, out_json, _reading(config))
        skipped: list[str] = []  # --skip_missing: listed in the JSON, as a model's evaluation does
        records = eval_records(config, config.val_dataset, with_proposals=False, skipped=skipped)
        return score_prediction_folder(
            records, config.pred_dir, out_json, _reading(config), skipped=skipped
        )

    if not config.checkpoint and not config.model_dir:
        raise ValueError("--checkpoint or --model_dir is required (or --pred_dir for saved masks)")
    if config.checkpoint and config.model_dir:
        raise ValueError(
            "give one of --checkpoint (a training run) and --model_dir (an export), not both: "
            "--checkpoint"
        )
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.precision)
    if launched_as_group():  # several processes share the images; one needs no group
        init_process_group(device)
    model_config = LLMSegConfig(**{f.name: getattr(config, f.name) for f in fields(LLMSegConfig)})
    if config.model_dir:  # sizes and preprocessing come from the export
        exported = load_exported(config.model_dir, device, dtype)
        model, tokenizer = exported.model, exported.tokenizer
        config = dataclasses.replace(config, **exported.manifest.encoder_fields())
    else:
        tokenization = resolve_tokenization(config.tokenization, config.version)
        model_config = dataclasses.replace(model_config, tokenization=tokenization)
        config = dataclasses.replace(config, tokenization=tokenization)
        model, tokenizer = build_llm_seg(model_config, device, dtype)
        setup_trainable(model, model_config)
        load_trainable_weights(model, config.checkpoint, config.checkpoint_tag)
    if is_main_process():
        save_config(config, Path(config.out_dir) / "eval_config.json")
    dataset = build_eval_dataset(
        config,
        build_encoder(config, tokenizer, model.num_image_tokens, model.sam_image_size),
        config.val_dataset,
        with_proposals=model.mask_head != "sam",
    )
    selection = SelectionSettings(config.selection, config.iop_threshold, config.selection_top_k)
    visualize = -1 if config.visualize else 0
    if config.mode == "free":
        generation = GenerationSettings(config.max_new_tokens, config.generation_batch_size)
        metrics = evaluate_free(
            model, dataset, tokenizer, selection, device, dtype, config.out_dir, generation,
            visualize,
        )  # fmt: skip
        logger.info("%s: answers %s", config.val_dataset, metrics["answers"])
    else:
        metrics = evaluate(
            model,
            dataset,
            selection,
            device,
            dtype,
            tokenizer.pad_token_id,
            config.out_dir,
            visualize=visualize,
            history=config.history,
        )
    logger.info(
        "%s: gIoU %.4f  cIoU %.4f  ncIoU %.4f  (%d images)",
        config.val_dataset,
        metrics["giou"],
        metrics["ciou"],
        metrics["nciou"],
        metrics["num_images"],
    )
    if "grefcoco" in metrics:  # no-target rows: how often the model rightly answered nothing
        logger.info("%s: %s", config.val_dataset, metrics["grefcoco"])
    return metrics


if __name__ == "__main__":
    run_cli(main, EvalConfig, aliases=CONFIG_ALIASES)
