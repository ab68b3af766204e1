"""The training loop shared by the autoencoder, diffusion and GAN stages.

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
is refused, naming the differing keys; keys in `RESUME_IGNORED` (run length and bookkeeping) may
differ.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from histosynth.data.io import atomic_dir, atomic_file
from histosynth.device import pick_device, prepare_model
from histosynth.seeds import derive_seed

log = logging.getLogger(__name__)


# Dotted keys of the run config that may change between a checkpoint and its resumption: how far
# to train and how to report it, not what is trained.
RESUME_IGNORED = frozenset({
    "train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.num_workers", "train.device", "train.sample_every", "train.sample_count",
    "train.sample_steps", "train.sample_sampler", "train.sample_guidance", "autoencoder.path",
    "scale_items", "val_items",
})
BASE_COLUMNS = ("step", "epoch", "loss", "lr", "seconds", "samples_per_s")


class TrainingError(RuntimeError):
    """Training cannot start or go on."""


class DatasetError(TrainingError, ValueError):
    """The training data is empty or inconsistent."""


class ConfigMismatchError(TrainingError):
    """A checkpoint was made with a different training config."""


class NonFiniteLossError(TrainingError):
    """The loss (or gradient norm) became NaN or infinite."""


# ----------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of a model's weights, kept in a frozen copy of the model:
    ema = d * ema + (1 - d) * param after each `update`, with d = decay, or during warm-up
    d = min(decay, (1 + n) / (10 + n)) after n updates. Buffers are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for ema, param in zip(self.model.parameters(), model.parameters(), strict=True):
            ema.copy_(d * ema + (1 - d) * param.detach())
        for ema, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema.copy_(buffer)
        self.updates += 1


# ----------------------------------------------------------------------------- data

def check_dataset(dataset: Dataset, name: str = "training") -> dict:
    """Fail clearly on an empty dataset or items without an image; return the first item's shapes."""
    if dataset is None or len(dataset) == 0:
        raise DatasetError(f"the {name} dataset is empty (0 items): no patches reached this split; check the "
                           "patch index, the split assignment and the patch filters (min_tissue, min_label)")
    item = dataset[0]
    if not isinstance(item, Mapping) or "image" not in item:
        raise DatasetError(f"{name} dataset items must be dicts with 'image' (and 'cond', 'label'); got {type(item).__name__}")
    return {key: tuple(value.shape) for key, value in item.items() if torch.is_tensor(value) and value.ndim}


def dataset_labels(dataset) -> np.ndarray:
    """The class index of every item: the dataset's `labels` when it has them, else each item's 'label'."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i]["label"]) for i in range(len(dataset))]
    return np.asarray(labels, dtype=np.int64)


def _size(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape))


def collate(items: list[dict]) -> dict:
    """default_collate, after checking that every image (and cond map) has one size."""
    for key in ("image", "cond"):
        if key in items[0]:
            first = items[0][key]
            for item in items[1:]:
                if item[key].shape != first.shape:
                    raise DatasetError(f"training {key}s of different sizes: {_size(first)} and {_size(item[key])}; "
                                       "all patches must share one size (config patches.size)")
    return default_collate(items)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, weights: torch.Tensor | None = None) -> list[int]:
    """This process's item order for one epoch: a permutation fixed by (seed, epoch) or, with
    `weights`, n draws with replacement in proportion to them; padded by wrap-around to a multiple
    of the process count and dealt out round-robin."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    if weights is None:
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
    order += order[: (-n) % world]
    return order[rank::world]


def batch_draw(draw: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
    """Random values for the n items of this process's batch, draw(k) -> k rows (e.g.
    `lambda k: torch.randn(k, *x.shape[1:], device=x.device)`): draw(n) in one process; under a
    multi-process `fit`, whose processes share one torch RNG stream and hold items p, p + N, ... of
    the step's global batch, rows rank::N of draw(n * N): what each item would get in a one-process
    run with that global batch. Every process must call it alike (same n, same order)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return draw(n)
    world = dist.get_world_size()
    return draw(n * world)[dist.get_rank()::world]


def balance_weights(labels, strength: float) -> torch.Tensor:
    """Sampling weight per item, 1 / count(label)^strength: 0 keeps the data's class frequencies,
    1 draws every class label equally often (the rare class as often as the common one)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    counts = torch.bincount(labels)
    return counts[labels].double().pow(-float(strength))


def _loader(dataset, order: list[int], batch_size: int, num_workers: int, seed: int, epoch: int) -> DataLoader:
    # The explicit generator keeps the worker base seed off the global RNG (resumes stay identical).
    generator = torch.Generator().manual_seed(derive_seed(seed, "loader", epoch))
    return DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collate, num_workers=num_workers,
                      generator=generator, pin_memory=torch.cuda.is_available(), drop_last=False)


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    found = [p for p in directory.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and (p / "trainer.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _flatten(config: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain(config: Mapping) -> dict:
    """As JSON would give it back (tuples become lists), so saved and current configs compare."""
    return json.loads(json.dumps(config, default=str))


def config_differences(saved: Mapping, current: Mapping, ignore=RESUME_IGNORED) -> list[str]:
    """Dotted keys whose values differ between two run configs, ignoring `ignore`."""
    a, b = _flatten(_plain(saved)), _flatten(_plain(current))
    missing = object()
    return sorted(k for k in a.keys() | b.keys() if k not in ignore and a.get(k, missing) != b.get(k, missing))


def resume_key(section: Mapping, *context) -> str:
    """12 hex digits naming a training's checkpoint folder: a hash of its config section's keys a
    resume must match (all but RESUME_IGNORED) and of the data settings in `context`, so a changed
    config starts in a fresh folder and an unchanged one resumes."""
    flat = {k: v for k, v in _flatten(_plain(section)).items() if k not in RESUME_IGNORED}
    return hashlib.sha256(json.dumps([flat, _plain(list(context))], sort_keys=True).encode()).hexdigest()[:12]


def _weights_file(model_dir: Path) -> Path:
    files = sorted(model_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise TrainingError(f"{model_dir}: expected one .safetensors weights file, found {[f.name for f in files]}")
    return files[0]


def load_weights(model: nn.Module, model_dir: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(_weights_file(model_dir), device="cpu"))


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@dataclass
class Progress:
    step: int = 0
    seconds: float = 0.0  # training wall time over all runs


def _states(objects: dict, key: str) -> dict:
    """trainer.pt's entries for optimisers or LR schedules ({name: object}): one under `key` (the
    file as it was before fit took several optimisers), several under `key + 's'` by name."""
    if len(objects) == 1:
        return {key: next(iter(objects.values())).state_dict()}
    return {f"{key}s": {name: obj.state_dict() for name, obj in objects.items()}}


def _load_states(objects: dict, state: dict, key: str, path: Path) -> None:
    saved = state[f"{key}s"] if f"{key}s" in state else {next(iter(objects)): state[key]} if len(objects) == 1 else {}
    if set(saved) != set(objects):
        raise TrainingError(f"{path} holds the {key} states of {sorted(saved) or 'one unnamed ' + key}, this training "
                            f"has {sorted(objects)}; delete {path.parent} to start over")
    for name, obj in objects.items():
        obj.load_state_dict(saved[name])


def save_checkpoint(directory: Path, progress: Progress, model, ema, optimizers: dict, lr_schedules: dict, run_config,
                    rngs, loss_csv, keep):
    """Write `directory/step-<n>/` atomically (model/ and ema/ by save_pretrained, trainer.pt, config.json,
    loss.csv); then drop all but the newest `keep`. optimizers, lr_schedules: {update name: object}."""
    if not all_finite(model):
        raise NonFiniteLossError(f"refusing to checkpoint step {progress.step}: the model has non-finite weights")
    with atomic_dir(directory / f"step-{progress.step}") as tmp:
        model.save_pretrained(tmp / "model")
        if ema is not None:
            ema.model.save_pretrained(tmp / "ema")
        torch.save({"step": progress.step, "seconds": progress.seconds, **_states(optimizers, "optimizer"),
                    **_states(lr_schedules, "lr_schedule"), "ema_updates": ema.updates if ema else 0, "rng": rngs},
                   tmp / "trainer.pt")
        (tmp / "config.json").write_text(json.dumps(_plain(run_config), indent=2, sort_keys=True))
        if Path(loss_csv).is_file():
            shutil.copy2(loss_csv, tmp / "loss.csv")
    for old in checkpoints(directory)[: -max(1, int(keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return directory / f"step-{progress.step}"


def load_checkpoint(path: Path, run_config, model, ema, optimizers: dict, lr_schedules: dict, rank: int) -> Progress:
    """Restore everything `save_checkpoint` wrote, after checking the run config matches."""
    saved = json.loads((path / "config.json").read_text())
    differing = config_differences(saved, run_config)
    if differing:
        details = "; ".join(f"{k}: {_flatten(saved).get(k, '<absent>')!r} -> {_flatten(_plain(run_config)).get(k, '<absent>')!r}"
                            for k in differing)
        raise ConfigMismatchError(f"checkpoint {path} was made with a different config; differing keys: "
                                  f"{', '.join(differing)} ({details}). Restore those values, or delete "
                                  f"{path.parent} to start over.")
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    load_weights(model, path / "model")
    if ema is not None:
        load_weights(ema.model, path / "ema")
        ema.updates = state["ema_updates"]
    _load_states(optimizers, state, "optimizer", path)
    _load_states(lr_schedules, state, "lr_schedule", path)
    rngs = state["rng"]
    if rank >= len(rngs):
        raise TrainingError(f"{path} holds RNG states of {len(rngs)} processes; cannot resume process {rank} "
                            "(resume with the same number of processes)")
    set_rng_state(rngs[rank])
    return Progress(step=state["step"], seconds=state["seconds"])


# ----------------------------------------------------------------------------- loss log

class LossLog:
    """The loss CSV, appended as training runs. On resume, rows after the checkpoint's step are
    dropped (they belong to the interrupted run and will be recomputed)."""

    def __init__(self, path: Path, extra_columns=(), resume_step: int | None = None):
        self.path, self.columns = Path(path), [*BASE_COLUMNS, *extra_columns]
        if self.path.is_file():
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            keep = [r for r in rows if resume_step is not None and int(r["step"]) <= resume_step]
            with atomic_file(self.path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(keep)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, self.columns).writeheader()

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# ----------------------------------------------------------------------------- the loop

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
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision, step_scheduler_with_optimizer=False,
                       kwargs_handlers=handlers)


def _optimizer(params, s: Mapping, lr: float | None = None) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if s["optimizer"] not in kinds:
        raise TrainingError(f"train.optimizer must be one of {sorted(kinds)}, got {s['optimizer']!r}")
    return kinds[s["optimizer"]](params, lr=s["lr"] if lr is None else lr, betas=tuple(s["betas"]),
                                 weight_decay=s["weight_decay"])


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
    model: nn.Module          # the trained model (unwrapped, on the training device)
    ema: EMA | None
    step: int
    checkpoint: Path | None   # the last checkpoint written or loaded
    loss_csv: Path


def fit(model: nn.Module, loss_fn: Callable | Sequence[Update], dataset: Dataset, out: str | Path, *, settings: Mapping,
        run_config: Mapping, seed: int, accelerator=None, checkpoint_dir: str | Path | None = None,
        extra_columns=(), on_step: Callable | None = None, desc: str = "train") -> FitResult:
    """Train `model` (a diffusers ModelMixin, so save_pretrained works) on `dataset`.

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
        log.info("class-balanced sampling (class_balance=%s): share of draws per label %s", s["class_balance"],
                 {k: round(float(v), 3) for k, v in enumerate(shares) if v > 0})
    if s["batch_size"] % world:
        raise TrainingError(f"train.batch_size={s['batch_size']} is the global batch of a step; it must divide evenly "
                            f"among the {world} processes")
    per_process = s["batch_size"] // world
    if world > 1 and main:
        log.info("%d processes (%s backend, %s): each step's batch of %d is %d items per process", world,
                 torch.distributed.get_backend(), accelerator.device.type, s["batch_size"], per_process)
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
    lr_schedules = {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0)
                    for name, opt in optimizers.items()}
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
            raise TrainingError(f"checkpoint {found[-1]} is at step {progress.step}, beyond train.steps={s['steps']}; "
                                f"raise train.steps or delete {checkpoint_dir}")
    else:
        progress = Progress()
        torch.manual_seed(derive_seed(seed, "train", 0))
        random.seed(derive_seed(seed, "python", rank))
        np.random.seed(derive_seed(seed, "numpy", rank))
    last_checkpoint = found[-1] if found else None
    loss_log = LossLog(out / "loss.csv", extra_columns, resume_step=progress.step if found else None) if main else None

    # the loop
    with tqdm(total=s["steps"], initial=progress.step, desc=desc, disable=not main, dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 30) as bar:  # a log file: a line every 30 s
        window: dict[str, list[float]] = {}
        window_start, window_samples, first_size = time.perf_counter(), 0, None
        model.train()
        while progress.step < s["steps"]:
            epoch, done = divmod(progress.step, steps_per_epoch)
            order = epoch_order(len(dataset), seed, epoch, rank, world, weights)[done * per_process:]
            for batch in _loader(dataset, order, per_process, s["num_workers"], seed, epoch):
                size = _size(batch["image"][0])
                if first_size is None:
                    first_size = size
                elif size != first_size:
                    raise DatasetError(f"training images of different sizes: {first_size} and {size}; "
                                       "all patches must share one size (config patches.size)")
                batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                step = progress.step + 1
                values = {}
                for update in updates:
                    if step % update.every:
                        continue
                    what = "" if single else f"{update.name} "
                    loss, extras = update.loss_fn(model, batch)
                    mean_loss = accelerator.reduce(loss.detach().float(), "mean").item()
                    if not math.isfinite(mean_loss):
                        raise NonFiniteLossError(f"non-finite {what}loss ({mean_loss}) at step {step} (epoch {epoch}); training "
                                                 f"stopped, nothing saved for this run. Last good checkpoint: {last_checkpoint or 'none'}")
                    optimizer = optimizers[update.name]
                    optimizer.zero_grad(set_to_none=True)
                    accelerator.backward(loss)
                    if s["grad_clip"]:
                        norm = accelerator.clip_grad_norm_(_tensors(params[update.name]) or model.parameters(), s["grad_clip"])
                        if not math.isfinite(float(norm)):
                            raise NonFiniteLossError(f"non-finite {what}gradient norm at step {step} (epoch {epoch}); training "
                                                     f"stopped. Last good checkpoint: {last_checkpoint or 'none'}")
                    optimizer.step()
                    lr_schedules[update.name].step()
                    if update is updates[0]:
                        values["loss"] = mean_loss
                    if not single:
                        values[f"{update.name}_loss"] = mean_loss
                    if extras and world > 1:  # this process's values: logged as the mean over the processes
                        means = accelerator.reduce(torch.tensor([float(v) for v in extras.values()], device=accelerator.device), "mean")
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
                        loss_log.write({"step": step, "epoch": epoch, "lr": optimizers[names[0]].param_groups[0]["lr"],
                                        "seconds": progress.seconds, "samples_per_s": rate, **means, **(hooked or {})})
                    shown = ["loss"] if single else [f"{name}_loss" for name in names]
                    bar.set_postfix({**{k: f"{means[k]:.4g}" for k in shown if k in means}, "samples_s": f"{rate:.1f}"})
                    window, window_start, window_samples = {}, time.perf_counter(), 0
                bar.update(1)

                # checkpoints (every process hands over its RNG state) and periodic hooks
                if step % s["checkpoint_every"] == 0 or step == s["steps"]:
                    rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
                    if main:
                        last_checkpoint = save_checkpoint(checkpoint_dir, progress, raw, ema, optimizers, lr_schedules,
                                                          run_config, rngs, loss_log.path, s["keep_checkpoints"])
                    accelerator.wait_for_everyone()
                    last_checkpoint = checkpoint_dir / f"step-{step}"
                if progress.step >= s["steps"]:
                    break
    accelerator.wait_for_everyone()
    return FitResult(raw, ema, progress.step, last_checkpoint, out / "loss.csv")


# ----------------------------------------------------------------------------- grids and the CLI

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images[:, :3].permute(0, 2, 3, 1).cpu().numpy()


def save_grid(rows: list[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    """Write rows of images in [-1, 1] (each (N, 3, H, W), same H and W) as one PNG grid, atomically."""
    from PIL import Image

    rows = [to_uint8(r) for r in rows]
    n, (h, w) = max(len(r) for r in rows), rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = image
    with atomic_file(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return Path(path)
