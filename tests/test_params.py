"""What each rule's job reads (histosynth.params) and the generator table it is built from
(histosynth.generators.table): torch-free, a job's params hold only the keys its code reads, and a
training's resume key only what changes its weights."""

import copy
import subprocess
import sys

import pytest

from histosynth import params
from histosynth.config import validated
from histosynth.generators import table

LABELS = {"source": "regions", "classes": ["Blood vessel", "Inflammation", "Fat"], "regions": True}


def config(**sections) -> dict:
    """A validated config with `sections` laid over the schema's defaults."""
    return validated({"gan": {"enabled": True}, **sections})


def test_the_workflows_modules_load_no_torch():
    """The DAG parse imports these: a tuple and a hash must not cost loading torch and diffusers."""
    code = (
        "import sys, histosynth.params, histosynth.generators.table, histosynth.generators.base_model; "
        "print(sorted(m for m in ('torch', 'diffusers', 'timm') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_trainings_read_no_conditioning_but_the_diffusion_model():
    cfg = config()
    for stage in ("autoencoder", "gan", "lora"):
        assert "conditioning" not in params.training_params(cfg, LABELS, stage), stage
    assert params.training_params(cfg, LABELS, "diffusion")["conditioning"] == cfg["conditioning"]
    changed = config(conditioning={"boundaries": False})
    for stage in ("autoencoder", "gan", "lora"):
        assert params.checkpoint_key(changed, LABELS, stage) == params.checkpoint_key(cfg, LABELS, stage), stage
    assert params.checkpoint_key(changed, LABELS, "diffusion") != params.checkpoint_key(cfg, LABELS, "diffusion")


def test_the_gan_reads_its_monitors_quality_keys_only_while_it_monitors():
    monitoring = params.training_params(config(), LABELS, "gan")
    assert sorted(monitoring["quality"]) == sorted(params.MONITOR_QUALITY_KEYS) and "weights_dir" in monitoring
    assert "lpips_pairs" not in monitoring["quality"]
    quiet = params.training_params(config(gan={"enabled": True, "train": {"eval_every": 0}}), LABELS, "gan")
    assert "quality" not in quiet and "weights_dir" not in quiet
    # what the monitor reads changes no weights: the checkpoints resume
    more_subsets = config(quality={"kid_subsets": 7})
    assert params.checkpoint_key(more_subsets, LABELS, "gan") == params.checkpoint_key(config(), LABELS, "gan")
    assert params.checkpoint_key(config(gan={"enabled": True, "z_dim": 64}), LABELS, "gan") != params.checkpoint_key(
        config(), LABELS, "gan"
    )


def test_run_length_changes_no_resume_key_but_the_model_does():
    cfg = config()
    longer = config(diffusion={"train": {"steps": cfg["diffusion"]["train"]["steps"] + 10}})
    wider = config(diffusion={"channels": cfg["diffusion"]["channels"] * 2})
    assert params.checkpoint_key(longer, LABELS, "diffusion") == params.checkpoint_key(cfg, LABELS, "diffusion")
    assert params.checkpoint_key(wider, LABELS, "diffusion") != params.checkpoint_key(cfg, LABELS, "diffusion")


def test_curation_consistency_and_report_read_their_own_quality_keys():
    cfg = config()
    assert sorted(params.curation_params(cfg, LABELS)["quality"]) == sorted(params.CURATION_QUALITY_KEYS)
    consistency = params.consistency_params(cfg, LABELS, None)
    assert sorted(consistency["quality"]) == sorted(params.CONSISTENCY_QUALITY_KEYS)
    assert consistency["patches"] == {"mpp": cfg["patches"]["mpp"]} and consistency["nuclei"]["model"] is None
    report = params.quality_params(cfg, LABELS)
    assert "consistency" not in report["quality"] and report["quality"]["lpips_pairs"] == cfg["quality"]["lpips_pairs"]
    # a report-only key moves only the report's params
    changed = config(quality={"lpips_pairs": 3})
    assert params.curation_params(changed, LABELS) == params.curation_params(cfg, LABELS)
    assert params.consistency_params(changed, LABELS, None) == params.consistency_params(cfg, LABELS, None)
    assert params.quality_params(changed, LABELS) != params.quality_params(cfg, LABELS)


def test_params_are_sorted_and_leave_out_what_only_names_or_schedules_runs():
    cfg = config()
    shuffled = copy.deepcopy(cfg)
    shuffled["patches"] = dict(reversed(list(shuffled["patches"].items())))
    assert list(params.config_params(shuffled, LABELS, "patches")["patches"]) == sorted(
        set(cfg["patches"]) - {"workers"}
    )
    assert "seeds" not in params.task_params(cfg, LABELS, "segmentation")["segmentation"]
    assert set(params.task_params(cfg, LABELS, "classification")) == {"classification", "labels", "seed", "weights_dir"}


def test_each_set_reads_the_shared_synthesis_settings_and_its_own_family():
    cfg = config()
    for name, own in (("synth", "synthesize"), ("inpaint", "inpaint"), ("gan", "gan"), ("lora150", "lora")):
        synthesis = params.synthesis_params(cfg, LABELS, name)["synthesis"]
        assert own in synthesis and not {"synthesize", "inpaint", "gan", "lora"} - {own} & set(synthesis), name
        assert synthesis["batch_size"] == cfg["synthesis"]["batch_size"]


def test_the_table_names_each_sets_rule_and_which_sets_have_masks():
    assert [table.set_rule(name) for name in ("synth", "inpaint", "gan", "lora50")] == [
        "synthesize",
        "inpaint",
        "gan_synthesize",
        "lora_synthesize",
    ]
    assert [table.has_masks(name) for name in ("synth", "inpaint", "gan", "lora100")] == [True, True, False, False]
    with pytest.raises(table.UnknownGeneratorError, match="no generator makes a synthetic set named 'loraX'"):
        table.family("loraX")
    with pytest.raises(table.UnknownGeneratorError, match="no generator 'vae'"):
        table.generator("vae")


def test_the_sets_and_trainings_a_config_makes():
    base = validated({})
    assert table.synthetic_sets(base) == [
        "synth",
        *(["inpaint"] if base["synthesis"]["inpaint"]["target_class"] else []),
    ]
    every = validated(
        {
            "gan": {"enabled": True},
            "lora": {"enabled": True, "base_model": "sd"},
            "diffusion": {"space": "latent"},
            "synthesis": {"inpaint": {"target_class": "Fat"}, "lora": {"scales": [1.0, 0.5]}},
        }
    )
    assert table.synthetic_sets(every) == ["synth", "inpaint", "gan", "lora100", "lora50"]
    assert [g.name for g in table.trained(every)] == ["autoencoder", "diffusion", "gan", "lora"]
    assert [g.name for g in table.trained(base)] == ["diffusion"]
    assert table.generator("gan").losses == "results/gan/loss.csv"
