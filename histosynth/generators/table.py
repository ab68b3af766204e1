"""The generator table: each trained generative model described once (torch-free: the workflow's
DAG parse reads it). Who reads it: the workflow (rule names, model folders, which config keys a
training reads, which sets have masks), launch (the trainer module of a stage), generate (what a
registered model draws from), the registry (model folders) and mixing (the rule of a set).

Adding a generator: a `Generator` row here (and a `SetFamily` for each kind of set it makes), its
trainer module with main(argv), its sampling entry, and a rule file with the names given here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from histosynth.config import lora_set

# A synthetic set's folder holds its manifest (one row per image, paths relative to the folder).
MANIFEST = "manifest.parquet"


@dataclass(frozen=True)
class SetFamily:
    """One kind of synthetic set a generator makes."""

    name: str  # the set's name; a set per LoRA scale is named prefix + scale (histosynth.config.lora_set)
    rule: str  # the rule that writes results/synthetic/<set>
    settings: str  # its subsection of config `synthesis`
    masks: bool  # its images come with label masks (segmentation can train on them)
    entry: str  # "module:function" that samples it
    per_scale: bool = False  # one set per synthesis.<settings>.scales entry
    requires: str | None = None  # a key of its settings that must be set for the set to be made


@dataclass(frozen=True)
class Generator:
    """One trained model of the generative stage: how it is trained, where it lands, what it makes."""

    name: str  # its config section, its training's `stage`, its registry model kind
    training_rule: str
    trainer: str  # the module whose main(argv) trains it (histosynth.generators.launch)
    model: str  # the training rule's model folder
    reads: tuple[str, ...]  # top-level config keys its training reads besides its own section
    draws_on: str | None  # what sampling is conditioned on: "maps" (conditioning maps), "labels", None (makes no set)
    sets: tuple[SetFamily, ...] = ()
    trained_when: tuple[str, str, object] | None = (
        None  # (section, key, value) of the config that turns it on; None: always
    )
    builds_on: str | None = None  # a model it trains on top of (the latent diffusion model's autoencoder)
    monitors: bool = (
        False  # measures fidelity while it trains (histosynth.generators.monitor; <section>.train.eval_every)
    )
    previews: str | None = None  # the set family whose sampling settings its preview grids use

    @property
    def losses(self) -> str:
        """The training's loss CSV (beside the model folder)."""
        return f"{self.model.rsplit('/', 1)[0]}/loss.csv"


# The data settings every training reads besides its own section.
DATA_KEYS = ("seed", "classes", "labels")

GENERATORS = (
    Generator(
        "autoencoder",
        "train_autoencoder",
        "histosynth.generators.autoencoder",
        "results/autoencoder/model",
        DATA_KEYS,
        None,
        trained_when=("diffusion", "space", "latent"),
    ),
    Generator(
        "diffusion",
        "train_diffusion",
        "histosynth.generators.train_diffusion",
        "results/diffusion/model",
        ("seed", "classes", "conditioning", "labels"),
        "maps",
        (
            SetFamily("synth", "synthesize", "synthesize", True, "histosynth.generators.synthesis:run_stage"),
            SetFamily(
                "inpaint",
                "inpaint",
                "inpaint",
                True,
                "histosynth.generators.synthesis:run_stage",
                requires="target_class",
            ),
        ),
        builds_on="autoencoder",
    ),
    Generator(
        "gan",
        "train_gan",
        "histosynth.generators.gan",
        "results/gan/model",
        DATA_KEYS,
        "labels",
        (SetFamily("gan", "gan_synthesize", "gan", False, "histosynth.generators.label_sets:gan_stage"),),
        trained_when=("gan", "enabled", True),
        monitors=True,
    ),
    Generator(
        "lora",
        "train_lora",
        "histosynth.generators.lora",
        "results/lora/adapter",
        DATA_KEYS,
        "labels",
        (
            SetFamily(
                "lora", "lora_synthesize", "lora", False, "histosynth.generators.label_sets:lora_stage", per_scale=True
            ),
        ),
        trained_when=("lora", "enabled", True),
        previews="lora",
    ),
)
BY_NAME = {generator.name: generator for generator in GENERATORS}
FAMILIES = tuple(family for generator in GENERATORS for family in generator.sets)


class UnknownGeneratorError(KeyError):
    """A stage or set name that no generator of the table has."""


def generator(name: str) -> Generator:
    """The table's row of generator (stage) `name`."""
    if name not in BY_NAME:
        raise UnknownGeneratorError(f"no generator {name!r}; one of {sorted(BY_NAME)}")
    return BY_NAME[name]


def family(set_name: str) -> SetFamily:
    """The family of synthetic set `set_name` (lora150 is a set of family lora)."""
    for candidate in FAMILIES:
        if set_name == candidate.name or (
            candidate.per_scale and set_name.startswith(candidate.name) and set_name[len(candidate.name) :].isdigit()
        ):
            return candidate
    raise UnknownGeneratorError(
        f"no generator makes a synthetic set named {set_name!r}; the sets are "
        f"{[f.name + ('<scale x 100>' if f.per_scale else '') for f in FAMILIES]}"
    )


def set_rule(set_name: str) -> str:
    """The rule that makes synthetic set `set_name`."""
    return family(set_name).rule


def has_masks(set_name: str) -> bool:
    """Whether synthetic set `set_name` has label masks (segmentation can train on it)."""
    return family(set_name).masks


def enabled(config: Mapping, name: str) -> bool:
    """Whether the config trains generator `name` (its `trained_when` setting; the autoencoder only
    for a latent diffusion model, the GAN and LoRA when enabled)."""
    when = generator(name).trained_when
    return when is None or config[when[0]][when[1]] == when[2]


def trained(config: Mapping) -> list[Generator]:
    """The generators this config trains, in table order."""
    return [g for g in GENERATORS if enabled(config, g.name)]


def synthetic_sets(config: Mapping) -> list[str]:
    """The synthetic sets this config makes, in table order: each family of each trained generator
    whose required setting is set (inpaint: a target class), one per scale of a per-scale family."""
    names = []
    for made_by in trained(config):
        for kind in made_by.sets:
            settings = config["synthesis"][kind.settings]
            if kind.per_scale:
                names += [lora_set(scale) for scale in settings["scales"]]
            elif kind.requires is None or settings[kind.requires]:
                names.append(kind.name)
    return names
