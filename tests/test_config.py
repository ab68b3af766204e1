import pytest
import yaml

from conftest import REPO
from histosynth.config import CONFIG_SCHEMA, ConfigError, key_table, load_config, read_slide_sheet, validated


def schema_keys(properties, prefix=""):
    for key, sub in properties.items():
        if sub.get("type") == "object" and "properties" in sub:
            yield from schema_keys(sub["properties"], f"{prefix}{key}.")
        else:
            yield prefix + key


def test_every_key_has_a_default_a_description_and_documentation():
    schema = yaml.safe_load(CONFIG_SCHEMA.read_text())
    for key in schema_keys(schema["properties"]):
        assert f"| `{key}` |" in key_table()
    assert key_table() in (REPO / "config/README.md").read_text(), "regenerate: python -m histosynth.config"
    assert "| `` |" not in key_table() and "|  |" not in key_table()  # every key has a description
    defaults = load_config()
    assert defaults["patches"]["tissue"]["mpp"] == 8.0 and defaults["classes"][0] == "Blood vessel"


@pytest.mark.parametrize("preset", ["config.yaml", "tiny.yaml", "thesis.yaml"])
def test_shipped_presets_validate(preset):
    assert load_config(REPO / "config" / preset)["run_id"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"patches": {"size": "big"}}, "'big' is not of type 'integer'"),
        ({"patches": {"min_tissue": 1.5}}, "1.5 is greater than the maximum of 1"),
        ({"classes": "Fat"}, "'Fat' is not of type 'array'"),
        ({"patchez": {}}, "Additional properties are not allowed"),
        ({"patches": {"target_class": "Tumour"}}, r"patches.target_class names \['Tumour'\], which are not in classes"),
        ({"priority": ["Fat", "Tissue"]}, r"priority names \['Tissue'\]"),
    ],
)
def test_wrong_types_are_schema_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        validated(bad, "my.yaml")


def test_slide_sheet_validation(tmp_path):
    sheet = tmp_path / "slides.tsv"
    sheet.write_text("slide\timage\tannotations\tsplit\na\ta.svs\t\ttrain\nb\tb.svs\tb.geojson\ttest\n")
    table = read_slide_sheet(sheet)
    assert table.loc["b", "annotations"] == "b.geojson" and table.loc["a", "mpp"] == ""
    sheet.write_text("slide\timage\tsplit\na\ta.svs\ttraining\n")
    with pytest.raises(ConfigError, match="'training' is not one of"):
        read_slide_sheet(sheet)
    sheet.write_text("slide\timage\tsplit\na\ta.svs\ttrain\na\tb.svs\ttest\n")
    with pytest.raises(ConfigError, match="repeated: a"):
        read_slide_sheet(sheet)
    sheet.write_text("slide\timage\tsplit\tmpp\na\ta.svs\ttrain\tfast\n")
    with pytest.raises(ConfigError, match="mpp must be empty or a positive number"):
        read_slide_sheet(sheet)


def test_model_defaults_in_code_match_the_schema():
    from histosynth import autoencoder, diffusion, quality, segmentation

    schema_defaults = validated({}, "defaults")
    assert schema_defaults["autoencoder"] == autoencoder.DEFAULTS
    assert schema_defaults["diffusion"] == diffusion.DEFAULTS
    runs = schema_defaults["segmentation"].pop("seeds")  # the workflow's run wildcards, not a model setting
    assert runs == [0, 1, 2] and schema_defaults["segmentation"] == segmentation.SEGMENTATION_DEFAULTS
    assert schema_defaults["quality"] == quality.QUALITY_DEFAULTS


@pytest.mark.parametrize("preset", ["demo", "tiny", "thesis"])
def test_presets_layer_on_the_default(preset):
    from histosynth.config import load_preset

    config = load_preset(preset)
    assert config["classes"] == ["Blood vessel", "Inflammation", "Fat"]
    assert config["diffusion"]["num_classes"] == 4


def test_thesis_preset_is_the_thesis():
    from histosynth.config import load_preset

    thesis = load_preset("thesis")
    assert (thesis["patches"]["size"], thesis["patches"]["stride"], thesis["patches"]["min_tissue"]) == (256, 128, 0.5)
    assert thesis["diffusion"]["train"]["batch_size"] == 16 and thesis["diffusion"]["train"]["lr"] == 2e-4
    assert len(thesis["diffusion"]["multipliers"]) - 1 == 4  # four downsamplings


def test_num_classes_must_fit_the_classes():
    with pytest.raises(ConfigError, match=r"diffusion.num_classes must be 0 .* or len\(classes\) \+ 1 = 4"):
        validated({"diffusion": {"num_classes": 3}}, "my.yaml")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"mixing": {"ratios": [{"name": "a", "synthetic": 1}, {"name": "a", "synthetic": 0}]}}, "repeated: a"),
        ({"mixing": {"ratios": [{"name": "a b", "synthetic": 1}]}}, r"mixing.ratios.0.name: 'a b' does not match"),
        ({"mixing": {"ratios": [{"name": "a", "synthetic": -1}]}}, "mixing.ratios.0.synthetic: -1 is less than the minimum"),
        ({"mixing": {"sources": ["inpaint"]}}, "synthesis.inpaint.target_class is null"),
        ({"report": {"baseline": "nope"}}, r"report.baseline 'nope' is not one of mixing.ratios \['real', 'syn50', 'syn100'\]"),
        ({"segmentation": {"encoder_depth": 3}}, "one entry per encoder stage"),
        ({"segmentation": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}}, "scse needs decoder_channels >= 16"),
        ({"patches": {"size": 48}}, "48 is not divisible by 2\\^segmentation.encoder_depth = 32"),
        ({"segmentation": {"classes": ["Tumour"]}}, r"segmentation.classes names \['Tumour'\]"),
        ({"segmentation": {"seeds": [1, 1]}}, "segmentation.seeds: \\[1, 1\\] has non-unique elements"),
    ],
)
def test_evaluation_settings_are_checked(bad, message):
    with pytest.raises(ConfigError, match=message):
        validated(bad, "my.yaml")


def test_baseline_is_the_configured_ratio_else_the_first_real_only_one():
    from histosynth.config import baseline_ratio

    ratios = [{"name": "synonly", "synthetic": 8, "real": False}, {"name": "syn4", "synthetic": 4},
              {"name": "real", "synthetic": 0}]
    assert baseline_ratio(ratios) == "real"
    assert baseline_ratio(ratios, "syn4") == "syn4"
    assert baseline_ratio(ratios[:2]) == "synonly"
