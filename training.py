"""Train (or, with ``--eval_only``, evaluate) LLM-Seg with DeepSpeed.

GPUs:   deepspeed --include localhost:0,1 training.py --version ... --dataset_dir ... [flags]
CPU:    python training.py ...            (one process, gloo)
        torchrun --nproc_per_node 2 training.py ...   (several CPU processes, gloo)

Everything a run needs is a flag (``python training.py --help``); the resolved config is written
to ``<log_base_dir>/<exp_name>/config.json``. Checkpoints go to ``.../ckpt_model`` (last + best),
TensorBoard logs to the run folder, one ``metrics.json`` per evaluation to ``.../eval/``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from model.builder import CONFIG_ALIASES, LLMSegConfig, build_llm_seg, setup_trainable
from model.evaluation import SelectionSettings, evaluate
from utils.cli import run_cli
from utils.config import save_config
from utils.data.builders import (
    DataConfig,
    build_encoder,
    build_eval_dataset,
    build_train_dataset,
    check_val_dataset,
    training_mixture,
)
from utils.data.images import load_rgb_image
from utils.data.mixing import ResumableSampler
from utils.data.no_target import check_rejection_data
from utils.data.samples import collate_batch
from utils.device import resolve_device, resolve_dtype
from utils.distributed import (
    OptimizationSettings,
    barrier,
    ensure_process_group_env,
    init_process_group,
    initialize_engine,
    is_main_process,
    rank,
    world_size,
)
from utils.legacy_tokenizer import resolve_tokenization
from utils.logging_setup import setup_logging
from utils.run_checkpoints import (
    CHECKPOINT_DIR,
    holds_saves,
    load_trainable_weights,
    resumable_tag,
    resume_training_checkpoint,
    save_training_checkpoint,
)

# the losses logged (and written to TensorBoard) when the model reports them
LOGGED_LOSSES = ("loss", "ce_loss", "align_loss", "iop_loss", "ref_loss", "bce_loss", "dice_loss")

logger = logging.getLogger("training")


@dataclass
class TrainConfig(LLMSegConfig, DataConfig):
    """LLM-Seg training and evaluation."""

    exp_name: str = field(
        default="llmseg", metadata={"help": "run name (folder under log_base_dir)"}
    )
    log_base_dir: str = field(default="./runs", metadata={"help": "where runs are written"})
    vision_pretrained: str = field(
        default="",
        metadata={"help": "SAM checkpoint; accepted for upstream compatibility, unused at run "
                  "time (proposals are precomputed by prepare_datasets/)"},
    )  # fmt: skip
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    steps_per_epoch: int = field(default=500, metadata={"help": "optimizer steps per epoch"})
    batch_size: int = field(default=1, metadata={"help": "images per micro-batch per process"})
    grad_accumulation_steps: int = field(default=10, metadata={"help": "micro-batches per step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    gradient_clipping: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    zero_stage: int = field(
        default=2, metadata={"help": "DeepSpeed ZeRO stage", "choices": [0, 1, 2, 3]}
    )
    workers: int = field(default=2, metadata={"help": "DataLoader workers per process"})
    seed: int = field(default=0, metadata={"help": "seed of data sampling and initialisation"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    print_freq: int = field(default=1, metadata={"help": "log every N optimizer steps"})
    eval_only: bool = field(default=False, metadata={"help": "evaluate a checkpoint and exit"})
    no_eval: bool = field(default=False, metadata={"help": "skip per-epoch validation"})
    visualize: bool = field(default=False, metadata={"help": "write overlays of every val image"})
    num_tensorboard_images: int = field(default=4, metadata={"help": "val overlays per eval"})
    selection: str = field(
        default="iop",
        metadata={"help": "mask selection", "choices": ["argmax", "iop", "hybrid", "topk_iop"]},
    )
    iop_threshold: float = field(default=0.5, metadata={"help": "IoP threshold of selection"})
    selection_top_k: int = field(default=5, metadata={"help": "top-k of topk_iop selection"})
    resume: str = field(
        default="", metadata={"help": "run or ckpt_model folder to resume / evaluate from"}
    )
    auto_resume: bool = field(default=True, metadata={"help": "resume from the run's last save"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "with --no_auto_resume: start afresh in a run folder that holds saves, "
                  "deleting them"},
    )  # fmt: skip
    init_weights: str = field(
        default="",
        metadata={"help": "start from the trainable weights of this run / ckpt_model / tag "
                  "(its best save), with a fresh optimizer, schedule and step (fine-tuning); a "
                  "single-round run can start a multi-round model (--mask_encoder), whose new "
                  "parts keep their initialisation"},
    )  # fmt: skip
    stop_at_step: int = field(
        default=0,
        metadata={"help": "save and exit after this optimizer step (for time-limited jobs; "
                  "rerun to continue); 0 runs to the end"},
    )  # fmt: skip

    @property
    def log_dir(self) -> Path:
        return Path(self.log_base_dir) / self.exp_name

    def model_config(self) -> LLMSegConfig:
        return LLMSegConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(LLMSegConfig)}
        )

    def selection_settings(self) -> SelectionSettings:
        return SelectionSettings(self.selection, self.iop_threshold, self.selection_top_k)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _validate(config: TrainConfig, device: torch.device) -> None:
    if device.type == "cpu" and config.precision == "fp16":
        raise ValueError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    for name in (
        "epochs", "steps_per_epoch", "batch_size", "grad_accumulation_steps",
        "conversations_per_sample",
    ):  # fmt: skip
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(config, name)}: --{name}")
    if not config.lr > 0:
        raise ValueError(f"--lr must be positive, got {config.lr}: --lr")
    # The flags naming the data, parsed now (they read no file): for every --rejection mode,
    # before the process group, config.json and the model.
    if not config.eval_only:
        training_mixture(config.dataset, config.sample_rates)
    if config.eval_only or not config.no_eval:
        check_val_dataset(config.val_dataset)


def _resume_dir(config: TrainConfig) -> Path:
    """The ``ckpt_model`` folder a resume reads: ``--resume``'s, else the run's own."""
    if not config.resume:
        return config.log_dir / CHECKPOINT_DIR
    resume_dir = Path(config.resume)
    return resume_dir / CHECKPOINT_DIR if (resume_dir / CHECKPOINT_DIR).is_dir() else resume_dir


def _check_saves(config: TrainConfig) -> None:
    """Stop before minutes of model building when the resume would fail or a fresh start would
    delete earlier saves (see :func:`utils.run_checkpoints.resumable_tag`)."""
    if config.eval_only:
        return
    if config.resume or config.auto_resume:
        resumable_tag(_resume_dir(config))
    elif holds_saves(config.log_dir / CHECKPOINT_DIR) and not config.overwrite:
        raise FileExistsError(
            f"{config.log_dir / CHECKPOINT_DIR}: holds saves that a fresh start would delete; "
            "resume them (drop --no_auto_resume), give --overwrite, or pick another --exp_name: "
            "--no_auto_resume"
        )


def run_evaluation(model, tokenizer, dataset, config, device, dtype, tag: str, writer=None):
    """Evaluate, log to TensorBoard and return the metrics."""
    out_dir = config.log_dir / "eval" / tag
    max_vis = -1 if config.visualize else config.num_tensorboard_images
    metrics = evaluate(
        model, dataset, config.selection_settings(), device, dtype,
        tokenizer.pad_token_id, out_dir, visualize=max_vis, history=config.history,
    )  # fmt: skip
    logger.info(
        "eval %s: gIoU %.4f cIoU %.4f ncIoU %.4f over %d images",
        tag, metrics["giou"], metrics["ciou"], metrics["nciou"], metrics["num_images"],
    )  # fmt: skip
    if writer is not None:
        step = int(tag.rsplit("step", 1)[-1]) if "step" in tag else 0
        for key in ("giou", "ciou", "nciou"):
            writer.add_scalar(f"val/{key}", metrics[key], step)
        for path in sorted((out_dir / "vis").glob("*.png"))[: config.num_tensorboard_images]:
            image = load_rgb_image(path)
            writer.add_image(f"val/{path.stem}", image, step, dataformats="HWC")
    return metrics


def main(config: TrainConfig) -> dict:
    """Run training (or evaluation only) as ``config`` says; return the last metrics."""
    setup_logging()
    ensure_process_group_env()
    device = resolve_device(config.device)
    _validate(config, device)
    if not config.eval_only:  # no-target data without --rejection: stop before model building
        check_rejection_data(config)
    # Recorded resolved (auto -> llava_legacy / hf) so exports and resumes use the same one.
    config.tokenization = resolve_tokenization(config.tokenization, config.version)
    init_process_group(device)
    _check_saves(config)
    seed_everything(config.seed)
    dtype = resolve_dtype(config.precision)
    log_dir = config.log_dir
    if is_main_process():
        save_config(config, log_dir / ("eval_config.json" if config.eval_only else "config.json"))

    model, tokenizer = build_llm_seg(config.model_config(), device, dtype)
    setup_trainable(model, config.model_config())
    encoder = build_encoder(config, tokenizer, model.num_image_tokens, model.sam_image_size)
    val_dataset = (
        None
        if config.no_eval and not config.eval_only
        else build_eval_dataset(
            config, encoder, config.val_dataset, with_proposals=model.mask_head != "sam"
        )
    )
    writer = SummaryWriter(log_dir) if is_main_process() else None

    if config.eval_only:
        source = Path(config.resume) if config.resume else log_dir
        load_trainable_weights(model, source)
        metrics = run_evaluation(
            model, tokenizer, val_dataset, config, device, dtype, "eval_only", writer
        )
        if writer:
            writer.close()
        return metrics

    per_rank_samples = (
        config.epochs * config.steps_per_epoch * config.grad_accumulation_steps * config.batch_size
    )
    train_dataset = build_train_dataset(config, encoder, per_rank_samples * world_size())
    settings = OptimizationSettings(
        lr=config.lr, beta1=config.beta1, beta2=config.beta2, weight_decay=config.weight_decay,
        batch_size=config.batch_size, grad_accumulation_steps=config.grad_accumulation_steps,
        total_steps=config.epochs * config.steps_per_epoch, warmup_steps=config.warmup_steps,
        gradient_clipping=config.gradient_clipping, precision=config.precision,
        zero_stage=config.zero_stage,
    )  # fmt: skip
    if config.init_weights:  # a resume below overrides these with the run's own weights
        load_trainable_weights(model, config.init_weights, added=model.added_parts())
    engine, _, scheduler = initialize_engine(model, settings, device)
    ckpt_dir = log_dir / CHECKPOINT_DIR
    state = None
    # every rank looks before rank 0 may delete (a rank looking later would skip the barrier)
    fresh_over_saves = not config.resume and not config.auto_resume and holds_saves(ckpt_dir)
    barrier()
    if config.resume:
        state = resume_training_checkpoint(engine, _resume_dir(config))
        if state is None:
            raise FileNotFoundError(f"--resume {config.resume}: no checkpoint to resume from")
    elif config.auto_resume:
        state = resume_training_checkpoint(engine, ckpt_dir)
    elif fresh_over_saves:  # with --overwrite (checked at start-up)
        if is_main_process():
            logger.warning("--overwrite: deleting the earlier saves in %s", ckpt_dir)
            shutil.rmtree(ckpt_dir)
        barrier()
    global_step = state["global_step"] if state else 0
    samples_done = state["samples_consumed"] if state else 0

    loader = DataLoader(
        train_dataset,
        batch_size=config.batch_size,
        sampler=ResumableSampler(per_rank_samples, rank(), world_size(), start=samples_done),
        collate_fn=partial(collate_batch, pad_token_id=tokenizer.pad_token_id),
        num_workers=config.workers,
        persistent_workers=False,
    )
    micro_steps_per_step = config.grad_accumulation_steps
    total_steps = config.epochs * config.steps_per_epoch
    logger.info(
        "training %d steps (%d epochs x %d), %d micro-batches of %d per step, %d process(es), "
        "from step %d",
        total_steps, config.epochs, config.steps_per_epoch, micro_steps_per_step, config.batch_size,
        world_size(), global_step,
    )  # fmt: skip
    metrics: dict = {}
    sums: dict[str, float] = {}
    started = time.time()
    model.train()
    data_iter = iter(loader)  # draws a base seed from the global RNG: restore the RNG after it
    if state and "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])  # LoRA dropout continues as if never stopped
    while global_step < total_steps:
        for _ in range(micro_steps_per_step):
            batch = next(data_iter)
            output = engine(batch.to(device, dtype))
            engine.backward(output.loss)
            engine.step()
            samples_done += config.batch_size
            for key in LOGGED_LOSSES:
                value = getattr(output, key)
                if value is not None:
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) / micro_steps_per_step
        global_step += 1
        if not all(math.isfinite(v) for v in sums.values()):
            raise FloatingPointError(f"non-finite loss at step {global_step}: {sums}")
        if global_step % config.print_freq == 0 and writer is not None:
            lr = scheduler.get_last_lr()[0]
            for key, value in sums.items():
                writer.add_scalar(f"train/{key}", value, global_step)
            writer.add_scalar("train/lr", lr, global_step)
            logger.info(
                "step %d/%d  %s  lr %.2e  %.1fs",
                global_step, total_steps, "  ".join(f"{k} {v:.4f}" for k, v in sums.items()), lr,
                time.time() - started,
            )  # fmt: skip
        sums = {}
        end_of_epoch = global_step % config.steps_per_epoch == 0
        stopping = global_step == config.stop_at_step
        if end_of_epoch or stopping:
            giou = None
            if end_of_epoch and not config.no_eval:
                tag = f"step{global_step}"
                metrics = run_evaluation(
                    model, tokenizer, val_dataset, config, device, dtype, tag, writer
                )
                giou = metrics["giou"]
            client_state = {
                "global_step": global_step,
                "epoch": global_step // config.steps_per_epoch,
                "samples_consumed": samples_done,
                "torch_rng": torch.get_rng_state(),
            }
            save_training_checkpoint(engine, ckpt_dir, client_state, giou)
        if stopping:
            logger.info("stopped at step %d as asked; rerun to continue", global_step)
            break
    if writer is not None:
        writer.close()
    return metrics


if __name__ == "__main__":
    run_cli(main, TrainConfig, aliases=CONFIG_ALIASES)
