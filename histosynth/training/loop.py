"""The step-counted training loop shared by the autoencoder, diffusion, GAN, LoRA and learned nuclei models.

`fit` reads top to bottom: data, optimiser(s), EMA, resume, then the loop with its NaN guard, loss
CSV, progress bar and checkpoints. A stage trains one model with one loss, or gives a sequence of
`Update`s: several optimisers over parts of one model, run in turn on each batch (a GAN's
discriminator and generator). It runs unchanged on one CPU, one GPU, or several processes under
`accelerate launch` (histosynth.generators.launch: one per GPU, or gloo CPU processes without CUDA).

Several processes train as one process would with the same config: `train.batch_size` is the
global batch of a step, dealt out round-robin (item j of the step's batch to process j mod N, so
each process takes batch_size / N items of its shard of the epoch), DDP averages the gradients,
the logged losses are averaged over the processes, and every process draws from the same torch
RNG stream, so the per-item randomness of a loss drawn with `batch_draw` (the diffusion noise,
timesteps and mask dropout) is the one-process run's. The loss curve and weights then match a
one-process run up to float rounding, except where a model's result depends on the per-process
batch (BatchNorm statistics, as in the GAN) or on randomness drawn otherwise (dropout).

Resuming follows the same trajectory as an uninterrupted run: a checkpoint holds the model, EMA,
optimiser(s), LR schedule(s), step counter and the RNG states of every process, and the data order is
a function of (seed, epoch) alone, so a resumed run skips the batches already consumed in the
current epoch and goes on with the same ones. A checkpoint made with a different training config
is refused, naming the differing keys; keys in `resume.RESUME_IGNORED` (run length and bookkeeping) may
differ.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from histosynth.device import pick_device, prepare_model
from histosynth.seeds import derive_seed
from histosynth.training.batches import balance_weights, check_dataset, epoch_order, loader, shape_text
from histosynth.training.checkpoints import (
    Progress,
    checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_weights,
)
from histosynth.training.ema import EMA
from histosynth.training.errors import DatasetError, NonFiniteLossError, TrainingError
from histosynth.training.losslog import LossLog

log = logging.getLogger(__name__)


def make_accelerator(settings: Mapping, find_unused_parameters: bool = False):
    """An Accelerator for one CPU, one GPU or a multi-GPU launch: bf16 only on CUDA.
    find_unused_parameters: for models whose steps leave parts without gradients (a GAN's
    discriminator step does not reach the generator), so that DDP does not wait for them."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    device = pick_device(settings.get("device", "auto"))
    precision = settings.get("mixed_precision", "auto")
    if precision == "auto" or device.type != "cuda":
        if precision == "bf16" and device.type != "cuda":
            log.info("mixed_precision bf16 needs CUDA; training in fp32 on %s", device)
        precision = "bf16" if device.type == "cuda" else "no"
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=precision,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )


def _optimizer(params, s: Mapping, lr: float | None = None) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if s["optimizer"] not in kinds:
        raise TrainingError(f"train.optimizer must be one of {sorted(kinds)}, got {s['optimizer']!r}")
    return kinds[s["optimizer"]](
        params, lr=s["lr"] if lr is None else lr, betas=tuple(s["betas"]), weight_decay=s["weight_decay"]
    )


def _tensors(params: list | None) -> list | None:
    """The parameters of an update's list of parameters or of parameter groups (dicts with 'params')."""
    if params is None:
        return None
    return [p for entry in params for p in (entry["params"] if isinstance(entry, dict) else [entry])]


@dataclass
class Update:
    """One optimiser of a training step, for `fit(model, [Update, ...], ...)`: it minimises
    loss_fn(model, batch) -> (loss, {name: value}) over params(model) (called on the unwrapped
    model; None: all its parameters; or torch parameter groups, dicts with their own 'lr') with its own optimiser (train.optimizer, betas and
    weight_decay; `lr`, None: train.lr) and LR warm-up schedule (over its own steps). A step runs
    its updates in order on the same batch, each with its own forward, NaN check, backward,
    clipping and optimiser step; an update with every=k runs on the steps divisible by k only (a
    GAN generator's step after every n_critic discriminator steps)."""

    name: str
    loss_fn: Callable
    params: Callable[[nn.Module], Iterable[nn.Parameter]] | None = None
    lr: float | None = None
    every: int = 1


@dataclass
class FitResult:
    model: nn.Module  # the trained model (unwrapped, on the training device)
    ema: EMA | None
    step: int
    checkpoint: Path | None  # the last checkpoint written or loaded
    loss_csv: Path


def fit(
    model: nn.Module,
    loss_fn: Callable | Sequence[Update],
    dataset: Dataset,
    out: str | Path,
    *,
    settings: Mapping,
    run_config: Mapping,
    seed: int,
    accelerator=None,
    checkpoint_dir: str | Path | None = None,
    extra_columns=(),
    on_step: Callable | None = None,
    desc: str = "train",
    save_model: Callable[[nn.Module, Path], None] = save_weights,
) -> FitResult:
    """Train `model` on `dataset`; checkpoints hold its weights as save_model(model, folder) writes
    them (default: save_pretrained where the model has it, else its state dict in safetensors).

    `settings` is a whole `train` section (e.g. config.section_defaults("diffusion")["train"]); its
    batch_size is the global batch, shared out among the processes (see the module docstring).
    loss_fn(model, batch) -> (loss, {name: value}) gets the batch on the device; the named values
    become `extra_columns` of `out/loss.csv`. Or loss_fn is a sequence of `Update`s, one optimiser
    each (all saved in the checkpoints); then each update's loss is also logged as `<name>_loss`
    (list those in extra_columns), `loss` and `lr` are the first update's, and the EMA follows the
    whole model after the step's last update. on_step(step, eval_model) runs on the main process
    after each step (eval_model: the EMA model, else the model); a dict it returns (e.g. FID at an
    evaluation step) is written into that step's loss.csv row (list its keys in extra_columns); it
    must leave the global RNGs alone, or resume is no longer bit-identical. `run_config` is what a resume
    must match (see RESUME_IGNORED); checkpoints go to checkpoint_dir (default out/checkpoints)."""
    from accelerate.utils import gather_object

    s = dict(settings)
    out = Path(out)
    checkpoint_dir = Path(checkpoint_dir or out / "checkpoints")
    accelerator = accelerator or make_accelerator(s)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    run_config = {**run_config, "processes": world}  # the data shards and RNG streams depend on it

    # data (class-balanced draws need the dataset's per-item `labels`)
    check_dataset(dataset)
    weights = None
    if s["class_balance"]:
        if getattr(dataset, "labels", None) is None:
            raise TrainingError(f"train.class_balance={s['class_balance']} needs a dataset with per-item labels")
        labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long)
        weights = balance_weights(labels, s["class_balance"])
        shares = torch.bincount(labels, weights=weights) / weights.sum()
        log.info(
            "class-balanced sampling (class_balance=%s): share of draws per label %s",
            s["class_balance"],
            {k: round(float(v), 3) for k, v in enumerate(shares) if v > 0},
        )
    if s["batch_size"] % world:
        raise TrainingError(
            f"train.batch_size={s['batch_size']} is the global batch of a step; it must divide evenly "
            f"among the {world} processes"
        )
    per_process = s["batch_size"] // world
    if world > 1 and main:
        log.info(
            "%d processes (%s backend, %s): each step's batch of %d is %d items per process",
            world,
            torch.distributed.get_backend(),
            accelerator.device.type,
            s["batch_size"],
            per_process,
        )
    steps_per_epoch = math.ceil(len(epoch_order(len(dataset), seed, 0, rank, world)) / per_process)

    # model, one optimiser and LR schedule per update (stepped here, once per step of its optimiser
    # whatever the process count), EMA
    updates = [Update("model", loss_fn)] if callable(loss_fn) else list(loss_fn)
    names = [u.name for u in updates]
    if not updates or len(set(names)) < len(names) or any(u.every < 1 for u in updates):
        raise TrainingError(f"fit needs one or more updates with distinct names and every >= 1; got {names}")
    single = len(updates) == 1
    model = prepare_model(model, accelerator.device)
    params = {u.name: list(u.params(model)) if u.params else None for u in updates}
    optimizers = {u.name: _optimizer(params[u.name] or model.parameters(), s, u.lr) for u in updates}
    warmup = max(0, int(s["lr_warmup"]))
    lr_schedules = {
        name: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0)
        for name, opt in optimizers.items()
    }
    ema = EMA(model, s["ema_decay"], s["ema_warmup"]) if s["ema_decay"] else None
    model, *prepared = accelerator.prepare(model, *optimizers.values())
    optimizers = dict(zip(optimizers, prepared, strict=True))
    raw = accelerator.unwrap_model(model)

    # resume, or start from the seed: one torch stream shared by the processes (see batch_draw),
    # Python's and NumPy's each process its own
    found = checkpoints(checkpoint_dir)
    if found:
        progress = load_checkpoint(found[-1], run_config, raw, ema, optimizers, lr_schedules, rank)
        log.info("resuming from %s (step %d of %d)", found[-1], progress.step, s["steps"])
        if progress.step > s["steps"]:
            raise TrainingError(
                f"checkpoint {found[-1]} is at step {progress.step}, beyond train.steps={s['steps']}; "
                f"raise train.steps or delete {checkpoint_dir}"
            )
    else:
        progress = Progress()
        torch.manual_seed(derive_seed(seed, "train", 0))
        random.seed(derive_seed(seed, "python", rank))
        np.random.seed(derive_seed(seed, "numpy", rank))
    last_checkpoint = found[-1] if found else None
    loss_log = LossLog(out / "loss.csv", extra_columns, resume_step=progress.step if found else None) if main else None

    # the loop
    with tqdm(
        total=s["steps"],
        initial=progress.step,
        desc=desc,
        disable=not main,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30,
    ) as bar:  # a log file: a line every 30 s
        window: dict[str, list[float]] = {}
        window_start, window_samples, first_size = time.perf_counter(), 0, None
        model.train()
        while progress.step < s["steps"]:
            epoch, done = divmod(progress.step, steps_per_epoch)
            order = epoch_order(len(dataset), seed, epoch, rank, world, weights)[done * per_process :]
            for batch in loader(dataset, order, per_process, s["num_workers"], seed, epoch):
                size = shape_text(batch["image"][0])
                if first_size is None:
                    first_size = size
                elif size != first_size:
                    raise DatasetError(
                        f"training images of different sizes: {first_size} and {size}; "
                        "all patches must share one size (config patches.size)"
                    )
                batch = {
                    k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in batch.items()
                }
                step = progress.step + 1
                values = {}
                for update in updates:
                    if step % update.every:
                        continue
                    what = "" if single else f"{update.name} "
                    loss, extras = update.loss_fn(model, batch)
                    mean_loss = accelerator.reduce(loss.detach().float(), "mean").item()
                    if not math.isfinite(mean_loss):
                        raise NonFiniteLossError(
                            f"non-finite {what}loss ({mean_loss}) at step {step} (epoch {epoch}); training "
                            f"stopped, nothing saved for this run. Last good checkpoint: {last_checkpoint or 'none'}"
                        )
                    optimizer = optimizers[update.name]
                    optimizer.zero_grad(set_to_none=True)
                    accelerator.backward(loss)
                    if s["grad_clip"]:
                        norm = accelerator.clip_grad_norm_(
                            _tensors(params[update.name]) or model.parameters(), s["grad_clip"]
                        )
                        if not math.isfinite(float(norm)):
                            raise NonFiniteLossError(
                                f"non-finite {what}gradient norm at step {step} (epoch {epoch}); training "
                                f"stopped. Last good checkpoint: {last_checkpoint or 'none'}"
                            )
                    optimizer.step()
                    lr_schedules[update.name].step()
                    if update is updates[0]:
                        values["loss"] = mean_loss
                    if not single:
                        values[f"{update.name}_loss"] = mean_loss
                    if extras and world > 1:  # this process's values: logged as the mean over the processes
                        means = accelerator.reduce(
                            torch.tensor([float(v) for v in extras.values()], device=accelerator.device), "mean"
                        )
                        extras = dict(zip(extras, means.tolist(), strict=True))
                    values.update(extras)
                if ema is not None:
                    ema.update(raw)
                progress.step = step
                # the hook (preview grids, fidelity) before logging: values it returns join this step's row
                hooked = on_step(step, ema.model if ema is not None else raw) if on_step is not None and main else None

                # logging
                now = time.perf_counter()
                window_samples += len(batch["image"]) * world
                for key, value in values.items():
                    window.setdefault(key, []).append(float(value))
                if step % s["log_every"] == 0 or step == s["steps"] or hooked:
                    progress.seconds += now - window_start
                    rate = window_samples / max(now - window_start, 1e-9)
                    means = {k: sum(v) / len(v) for k, v in window.items()}
                    if main:
                        loss_log.write(
                            {
                                "step": step,
                                "epoch": epoch,
                                "lr": optimizers[names[0]].param_groups[0]["lr"],
                                "seconds": progress.seconds,
                                "samples_per_s": rate,
                                **means,
                                **(hooked or {}),
                            }
                        )
                    shown = ["loss"] if single else [f"{name}_loss" for name in names]
                    bar.set_postfix({**{k: f"{means[k]:.4g}" for k in shown if k in means}, "samples_s": f"{rate:.1f}"})
                    window, window_start, window_samples = {}, time.perf_counter(), 0
                bar.update(1)

                # checkpoints (every process hands over its RNG state) and periodic hooks
                if step % s["checkpoint_every"] == 0 or step == s["steps"]:
                    rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
                    if main:
                        last_checkpoint = save_checkpoint(
                            checkpoint_dir,
                            progress,
                            raw,
                            ema,
                            optimizers,
                            lr_schedules,
                            run_config,
                            rngs,
                            loss_log.path,
                            s["keep_checkpoints"],
                            save_model,
                        )
                    accelerator.wait_for_everyone()
                    last_checkpoint = checkpoint_dir / f"step-{step}"
                if progress.step >= s["steps"]:
                    break
    accelerator.wait_for_everyone()
    return FitResult(raw, ema, progress.step, last_checkpoint, out / "loss.csv")
