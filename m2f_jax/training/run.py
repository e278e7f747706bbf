"""The training run behind ``m2f-jax train``: data, model init or fine-tune, the jitted step,
periodic validation mIoU, Orbax checkpoints with exact resume, a JSONL metrics log and the final
export to the HF layout (transformers loads it)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Optional

import numpy as np

from m2f_jax.progress import write_progress

# Model geometries to start from scratch. "tiny" is the embedded default's geometry.
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(
        backbone_config=dict(model_type="swin", embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                             window_size=7, drop_path_rate=0.0,
                             out_features=["stage1", "stage2", "stage3", "stage4"]),
        hidden_dim=64, feature_size=64, mask_feature_size=64, num_attention_heads=4,
        encoder_feedforward_dim=128, dim_feedforward=128, encoder_layers=2, decoder_layers=4,
        num_queries=16, train_num_points=2048,
    ),
    "swin-t": dict(
        backbone_config=dict(model_type="swin", embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                             window_size=7, drop_path_rate=0.3,
                             out_features=["stage1", "stage2", "stage3", "stage4"]),
    ),
}


@dataclasses.dataclass
class TrainArgs:
    data: str
    format: str = "semantic"
    init: str = "tiny"
    steps: int = 1000
    batch_size: int = 8
    crop: int = 512
    lr: float = 1e-4
    out: str = "runs/m2f"
    resume: bool = False
    seed: int = 0
    max_masks: int = 32
    val_every: int = 0  # 0: only at the end
    save_every: int = 500
    keep: int = 2
    warmup_steps: int = 0
    weight_decay: float = 0.05
    clip_norm: float = 0.01
    backbone_multiplier: float = 0.1
    min_scale: float = 0.1
    max_scale: float = 2.0
    num_workers: int = 2
    val_size: Optional[int] = None  # eval resize; default: the crop size
    val_first: bool = False  # also validate the initial weights (a baseline in the log and summary)
    num_points: Optional[int] = None  # points per mask for the loss; default: config.train_num_points
    mask_loss: str = "points"  # LossConfig.mask_loss: "points" (transformers') or "dense"; not in config.json
    progress: bool = True
    # several processes (jax.distributed); batch_size is the global batch
    coordinator_address: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    distributed: bool = False  # jax.distributed.initialize() from the cluster environment (TPU, SLURM)
    distributed_timeout: int = 300  # seconds to wait for every process to join


class InitError(ValueError):
    """``--init`` names no preset, config or checkpoint, or one that cannot be used: one line."""


def initial_model(init: str, id2label: Dict[int, str], seed: int):
    """(config, params): a preset or a config.json from scratch, or a checkpoint to fine-tune
    (its class head is re-initialised when the dataset's labels differ). Raises InitError (one
    line naming ``init``) when ``init`` is none of these or cannot be read or does not fit."""
    import jax
    import jax.numpy as jnp

    from m2f_jax.config import Mask2FormerConfig, read_json_object
    from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation

    params = None
    try:
        if init in PRESETS:
            config = Mask2FormerConfig.from_dict(dict(PRESETS[init], id2label=id2label))
        elif init.endswith(".json"):
            if not os.path.isfile(init):
                raise FileNotFoundError("no such config file.")
            config = Mask2FormerConfig.from_dict(dict(read_json_object(init), id2label=id2label, label2id=None))
        elif os.path.isdir(init) or "/" in init:
            from m2f_jax.hub import load

            loaded = load(init)
            config, params = loaded.config, jax.tree_util.tree_map(np.asarray, loaded.params)
            if config.id2label != id2label:
                config = Mask2FormerConfig.from_dict(dict(config.to_dict(), id2label=id2label, label2id=None))
                params = dict(params)
                params.pop("class_predictor")  # new label set: a fresh head below
        else:
            raise ValueError(
                f"neither a preset ({', '.join(PRESETS)}), a config .json file, nor a checkpoint folder / Hub id."
            )
    except (OSError, ValueError, TypeError, ImportError) as e:
        # the first line only: a checkpoint that does not fit lists every key below it
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InitError(f"--init {init}: {reason}") from e
    module = Mask2FormerForUniversalSegmentation(config)
    if params is None or "class_predictor" not in params:
        # Compiling init costs tens of seconds on CPU: only when something needs fresh weights.
        dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)
        fresh = jax.jit(module.init)(jax.random.PRNGKey(seed), dummy)["params"]
        if params is None:
            params = fresh
        else:
            params["class_predictor"] = fresh["class_predictor"]
    return config, module, params


def validation_processor(args: TrainArgs, num_labels: int):
    """The processor of validation and of the export: images resized to ``val_size`` squared
    (default: the crop size), so that validation scores what ``m2f-jax eval`` of the export gives.
    It records the training data's label convention, so that the export's
    ``processor(images, segmentation_maps)`` gives the classes the model was trained on: ADE-style
    semantic maps (0 is "other", class c is c + 1) reduce their labels, and ``num_labels``."""
    from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

    val_size = args.val_size or args.crop
    return Mask2FormerImageProcessor(size={"height": val_size, "width": val_size}, size_divisor=0, ignore_index=255,
                                     do_reduce_labels=args.format == "semantic", num_labels=num_labels)


def validate(model, params, dataset) -> Dict[str, float]:
    """Validation: ``m2f-jax eval``'s semantic metrics (mIoU, fwIoU, mACC, pACC, detectron2's
    definitions) of ``model`` (a ``m2f_jax.Mask2Former`` with the processor the run exports) with
    ``params`` on ``dataset``, so that the exported checkpoint scores what the run logged. NaN
    when the model's logits are not finite (a diverged run: no map to score)."""
    import jax
    import jax.numpy as jnp

    from m2f_jax.evaluation.run import evaluate
    from m2f_jax.processing.post_processing import NonFiniteLogitsError

    model.params = jax.tree_util.tree_map(jnp.asarray, params)
    try:
        return evaluate(model, dataset, task="semantic", progress=False)
    except NonFiniteLogitsError:
        return {k: float("nan") for k in ("mIoU", "fwIoU", "mACC", "pACC")}


def nonfinite_note(step: int, metrics: Dict[str, float]) -> Optional[str]:
    """What a step's non-finite loss or gradient norm means, or None when both are finite.

    A float32 gradient norm overflows (inf) once any gradient entry passes ~1.8e19, which a
    from-scratch Swin gives on zero-padded crops (LayerNorm of an all-zero token multiplies its
    gradient by 1/sqrt(eps) per block; transformers' model does the same). Clipping then scales the
    update to zero, exactly as ``torch.nn.utils.clip_grad_norm_`` does."""
    loss, grad_norm = metrics.get("loss", 0.0), metrics.get("grad_norm", 0.0)
    if metrics.get("invalid_labels", 0) > 0:
        return (f"step {step}: {int(metrics['invalid_labels'])} target(s) have class ids outside "
                "[0, num_labels): the loss is NaN by design and their examples add nothing to the gradient. "
                "Check the dataset's labels against the model's id2label.")
    if not math.isfinite(loss):
        return (f"step {step}: the loss is {loss}; the parameters are likely non-finite now. Lower "
                "--lr or check the data (targets, image values).")
    if not math.isfinite(grad_norm):
        return (f"step {step}: the gradient's global norm overflowed float32 ({grad_norm}), so "
                "gradient clipping made this update zero (as torch's clip_grad_norm_ does). Expected "
                "in the first steps of a Swin trained from scratch on zero-padded crops; if it "
                "persists, raise --min-scale (less padding), lower --lr, or fine-tune a checkpoint.")
    return None


class StopSignals:
    """While active, SIGTERM (what a preempted TPU VM or a scheduler sends) and SIGINT (Ctrl-C) set
    ``received`` (the signal's name) instead of ending the process, so that the train loop can
    save the step it completed and stop. Handlers are installed only in the main thread and
    restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def loss_config(config, args: TrainArgs):
    """The run's ``LossConfig``: the model config's loss fields and the run's ``mask_loss``."""
    from m2f_jax.modeling.criterion import LossConfig

    return LossConfig.from_config(config, mask_loss=args.mask_loss)


def train(args: TrainArgs) -> Dict[str, Any]:
    """Runs training; returns a summary (final metrics, validation, paths). With several processes
    (``jax.distributed``: the coordinator arguments, ``distributed=True`` or a detected cluster)
    every process runs this; process 0 logs, validates and exports."""
    import jax

    from m2f_jax.training import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           auto=args.distributed, timeout_s=args.distributed_timeout)
    from convert.folders import save_hf_folder
    from m2f_jax.data.augment import TrainTransform
    from m2f_jax.data.datasets import DataError, open_dataset
    from m2f_jax.data.pipeline import BatchIterator
    from m2f_jax.hub import Mask2Former
    from m2f_jax.training.checkpoint import CheckpointManager, abstract_state
    from m2f_jax.training.optimizer import make_optimizer
    from m2f_jax.training.train_step import BATCH_KEYS, TrainState, make_sharded_train_step

    primary = jax.process_index() == 0
    train_set = open_dataset(args.data, args.format, "train")
    val_set = open_dataset(args.data, args.format, "val")
    id2label = {int(k): v for k, v in train_set.id2label.items()}
    config, module, params = initial_model(args.init, id2label, args.seed)
    if args.num_points is not None:
        # recorded in the exported config.json, as transformers' train_num_points
        from m2f_jax.config import Mask2FormerConfig

        config = Mask2FormerConfig.from_dict(dict(config.to_dict(), train_num_points=int(args.num_points)))
    mesh = distributed.global_mesh()
    distributed.local_batch_size(args.batch_size, mesh)  # a clear error when it does not divide
    optimizer = make_optimizer(
        params, learning_rate=args.lr, weight_decay=args.weight_decay, backbone_multiplier=args.backbone_multiplier,
        clip_norm=args.clip_norm, total_steps=args.steps, warmup_steps=args.warmup_steps,
    )
    state = distributed.replicate(TrainState.create(params, optimizer.tx, args.seed), mesh)
    step_fn = make_sharded_train_step(module, loss_config(config, args), optimizer, mesh)

    os.makedirs(args.out, exist_ok=True)
    manager = CheckpointManager(os.path.join(args.out, "checkpoints"), save_every=args.save_every, keep=args.keep)
    transform = TrainTransform(crop_size=args.crop, min_scale=args.min_scale, max_scale=args.max_scale)
    batches = BatchIterator(
        train_set, args.batch_size, transform, max_masks=args.max_masks, seed=args.seed,
        num_workers=args.num_workers, process_index=jax.process_index(), process_count=jax.process_count(),
    )
    if args.resume:
        restored = manager.restore_latest(abstract_state(state), data=batches)
        if restored is not None:
            state, extra = restored
            if extra.get("data") is not None and batches.get_state() != extra["data"]:
                batches.set_state(extra["data"])  # no iterator file for this process count: the global position
            if primary:
                print(f"resumed from step {int(distributed.local_copy(state.step))}", file=sys.stderr)
    run_settings = {k: v for k, v in dataclasses.asdict(args).items()
                    if k not in ("process_id", "progress", "num_workers", "distributed_timeout")}
    distributed.barrier("start", args.distributed_timeout)
    distributed.check_agreement({
        "arguments": run_settings, "config": config.to_dict(), "step": int(distributed.local_copy(state.step)),
        "dataset": [len(train_set), len(val_set), sorted(id2label.items())],
    })
    log_path = os.path.join(args.out, "metrics.jsonl")
    val_every = args.val_every or args.steps
    last, val_metrics, val_initial = {}, {}, None
    nonfinite_steps = 0  # steps with a non-finite loss or gradient norm
    stop = StopSignals()

    def save(step, position, force):
        return manager.save(step, state, {"data": position, "config": config.to_dict()}, data=position, force=force)

    # the processor the export gets: validation scores what `m2f-jax eval` of the export gives
    processor = validation_processor(args, len(id2label))
    val_model = None

    def validation(params):
        nonlocal val_model
        params = distributed.local_copy(params)
        if val_model is None:
            val_model = Mask2Former(config, params, processor=processor)
        return validate(val_model, params, val_set)

    step = int(distributed.local_copy(state.step))
    flags = {"stop": [], "data_error": []}
    compiled = None
    with (open(log_path, "a") if primary else open(os.devnull, "w")) as log, batches, stop:
        if args.val_first and step == 0 and primary:
            val_initial = validation(state.params)
            log.write(json.dumps({"step": 0, **{f"val_{k}": v for k, v in val_initial.items()}}) + "\n")
        t_last = time.perf_counter()
        start_step = step
        while step < args.steps:
            position = batches.get_state()
            try:
                local, error = next(batches), None
            except DataError as e:
                local, error = None, e
            # every process stops at the same step: a stop signal or a bad file on any of them
            flags = distributed.any_process({"stop": stop.received is not None, "data_error": error is not None})
            if flags["stop"] or flags["data_error"]:
                if step > start_step and manager.latest_step() != step:
                    save(step, position, force=True)
                break
            batch = distributed.global_batch({k: local[k] for k in BATCH_KEYS}, mesh)
            if compiled is None:  # every process compiled (or received) the step before its first run
                compiled = step_fn.lower(state, batch).compile()
                distributed.barrier("compiled", args.distributed_timeout)
            state, metrics = compiled(state, batch)
            step = int(distributed.local_copy(state.step))
            last = {k: float(v) for k, v in distributed.local_copy(metrics).items()}
            note = nonfinite_note(step, last)
            if note is not None:
                nonfinite_steps += 1
                if nonfinite_steps == 1 and primary:  # once; the JSONL log has every step's values
                    print(("\n" if args.progress else "") + "warning: " + note, file=sys.stderr)
            now = time.perf_counter()
            images_per_s = args.batch_size / max(now - t_last, 1e-9)
            t_last = now
            record = {"step": step, **last, "images_per_s": images_per_s}
            if step % val_every == 0 or step == args.steps:
                if primary:
                    val_metrics = validation(state.params)
                    record.update({f"val_{k}": v for k, v in val_metrics.items()})
                distributed.barrier("validated", args.distributed_timeout)  # the others wait here
            log.write(json.dumps(record) + "\n")
            log.flush()
            if args.progress and primary:
                write_progress(step, args.steps, f" loss {last['loss']:.3f} lr {last['learning_rate']:.2e} "
                                                 f"{images_per_s:.1f} img/s")
            if step % args.save_every == 0 or step == args.steps:
                save(step, batches.get_state(), force=step == args.steps)
    manager.wait_until_finished()
    saved_step = manager.latest_step()
    manager.close()
    if step < args.steps and flags["data_error"]:  # a bad dataset file: the completed steps are kept
        if args.progress and primary:
            sys.stderr.write("\n")  # the error line starts below the progress bar
        kept = (f"step {step} is saved; fix or remove the file, then --resume"
                if saved_step == step and step > start_step else "no step of this run completed")
        if error is not None:
            raise DataError(f"{error} ({kept})") from error
        raise DataError(f"process(es) {', '.join(map(str, flags['data_error']))} could not read a dataset "
                        f"file (see their error) ({kept})")
    if step < args.steps:  # a stop signal
        received = stop.received or "SIGTERM"  # another process's signal
        where = (f"saved in {manager.directory}; --resume continues from it" if saved_step == step
                 else "before any step of this run: nothing new to save")
        if primary:
            print(f"\n{received}: stopped after step {step}, {where}.", file=sys.stderr)
        return {"step": step, "train": last, "val": val_metrics, "val_initial": val_initial, "export": None,
                "log": log_path, "nonfinite_steps": nonfinite_steps, "stopped": received}

    export = os.path.join(args.out, "hf") if primary else None
    if primary:
        save_hf_folder(jax.tree_util.tree_map(np.asarray, distributed.local_copy(state.params)), config, export)
        processor.save_pretrained(export)
    return {"step": step, "train": last, "val": val_metrics, "val_initial": val_initial,
            "export": export, "log": log_path, "nonfinite_steps": nonfinite_steps, "stopped": None}
