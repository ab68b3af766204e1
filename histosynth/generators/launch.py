"""Starting a generator training: the command line every trainer module shares (`cli`) and the
Snakemake jobs' entry (`launch`): one process on one device, or `accelerate launch` with one
process per GPU (gloo CPU processes where torch sees no CUDA device: what CI tests)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from histosynth.config import default, section_defaults
from histosynth.generators.monitor import feature_spaces
from histosynth.generators.table import BY_NAME, generator
from histosynth.training.errors import TrainingError

log = logging.getLogger(__name__)


def _factory(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--dataset must be MODULE:FUNCTION, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _read_config(path: Path) -> dict:
    """A run config file: JSON (what `launch` writes) or YAML. JSON is read as JSON: YAML 1.1 would
    take numbers like 1e-06 for strings."""
    import yaml

    text = path.read_text()
    return (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}


def cli(stage: str, train: Callable, argv: list[str] | None = None) -> int:
    """`python -m <the stage's trainer module> train ...`, shared by the autoencoder, diffusion, GAN and LoRA trainers.

    The dataset comes from a factory FUNCTION(indexes, split, config) -> Dataset named by --dataset."""
    made = generator(stage)
    trainer = made.trainer
    parser = argparse.ArgumentParser(prog=f"python -m {trainer}", description=f"train the {stage} model")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help=f"train (or resume training) the {stage} model")
    p.add_argument("--config", required=True, help=f"full workflow config (YAML or JSON); section '{stage}' is used")
    p.add_argument("--out", required=True, help="output folder: model/, loss.csv and the stage's reports")
    p.add_argument("--dataset", required=True, help="MODULE:FUNCTION building a Dataset from (indexes, split, config)")
    p.add_argument("--index", nargs="+", required=True, help="patch index parquet files")
    p.add_argument(
        "--checkpoints",
        help="checkpoint folder (default OUT/checkpoints); keep it outside "
        "Snakemake outputs so that a rerun can resume",
    )
    p.add_argument("--log", help="log file (default: stderr)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (e.g. the rule's threads)")
    if made.builds_on:
        p.add_argument(f"--{made.builds_on}", help=f"the {made.builds_on} model folder it trains on (if any)")
    args = parser.parse_args(argv)
    if args.log:
        from histosynth.logs import log_to

        log_to(args.log)
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = _read_config(Path(args.config))
    factory = _factory(args.dataset)
    data = factory(args.index, "train", config)
    val = factory(args.index, "val", config)
    extra = {made.builds_on: getattr(args, made.builds_on)} if made.builds_on else {}
    if (
        made.draws_on == "labels"
    ):  # class names in index order, where the job's labels are resolved (the workflow's are)
        labels = config.get("labels") or {}
        extra["labels"] = list(labels["classes"]) if "regions" in labels else None
    if made.monitors:  # fidelity during training in the quality stage's feature spaces
        quality = section_defaults("quality", config.get("quality"))
        spaces = (
            feature_spaces(quality, config.get("weights_dir") or default("weights_dir"))
            if section_defaults(stage, config.get(stage))["train"]["eval_every"]
            else []
        )
        extra.update(feature_spaces=spaces, quality=quality)
    if made.previews:  # the preview grids sample as its synthetic sets do
        extra["synthesis"] = config.get("synthesis")
    try:
        summary = train(
            data,
            args.out,
            config.get(stage, {}),
            seed=int(config.get("seed", 0)),
            val_dataset=val if val is not None and len(val) else None,
            checkpoint_dir=args.checkpoints,
            **extra,
        )
    except TrainingError as err:
        print(f"{trainer} train: error: {err}", file=sys.stderr)
        return 2
    log.info("%s", json.dumps(summary, default=str))
    return 0


def launch(
    stage: str,
    config: Mapping,
    indexes: Sequence[str],
    out: str | Path,
    *,
    checkpoints: str | Path,
    log: str | Path,
    gpus: int = 0,
    threads: int = 1,
    autoencoder: str | None = None,
) -> None:
    """Run the stage's trainer (`python -m <its table row's trainer> train`) for a Snakemake job: in this process on one device,
    under `accelerate launch` with one process per GPU when the job was given gpus > 1 (`multi_process_command`).

    The config's train.batch_size is the global batch whatever `gpus` is (histosynth.training.loop): more
    GPUs split each step's batch, they do not enlarge it. The `threads` are shared out among the processes."""
    import subprocess

    if stage not in BY_NAME:
        raise TrainingError(f"no trainer for stage {stage!r}; one of {sorted(BY_NAME)}")
    run_config = Path(checkpoints) / "workflow-config.json"
    run_config.parent.mkdir(parents=True, exist_ok=True)
    run_config.write_text(json.dumps(config, indent=1, default=str))
    processes = max(1, int(gpus))
    argv = [
        "train",
        "--config",
        str(run_config),
        "--out",
        str(out),
        "--dataset",
        "histosynth.generators.datasets:patch_dataset",
        "--index",
        *map(str, indexes),
        "--checkpoints",
        str(checkpoints),
        "--log",
        str(log),
        "--threads",
        str(max(1, int(threads) // processes)),
    ]
    if autoencoder:
        argv += ["--autoencoder", str(autoencoder)]
    if processes > 1:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as stream:  # the launcher's own messages (a worker's failure) join the workers' log
            code = subprocess.run(
                multi_process_command(stage, processes, argv), stdout=stream, stderr=subprocess.STDOUT
            ).returncode
    else:
        code = importlib.import_module(generator(stage).trainer).main(argv)
    if code:
        raise TrainingError(f"{stage} training failed (exit {code}); see {log}")


def multi_process_command(stage: str, processes: int, argv: Sequence[str]) -> list[str]:
    """`accelerate launch` of the stage's trainer in `processes` processes on this machine, by this Python (the
    job's environment, whatever PATH says). --multi_gpu is accelerate's torchrun launcher, one process per local rank;
    each trainer's Accelerator (training.make_accelerator) then takes a GPU each with NCCL or, where torch sees no
    CUDA device, the CPU with gloo (accelerate's MULTI_CPU). accelerate's own --cpu flag is no use here: it starts
    several processes through mpirun and a host file only, one process otherwise. --main_process_port 0: a free
    port, so that jobs on one machine do not collide on the default 29500."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--main_process_port",
        "0",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        generator(stage).trainer,
        *argv,
    ]
