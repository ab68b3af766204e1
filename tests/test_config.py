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
    from histosynth import autoencoder, diffusion

    schema_defaults = validated({}, "defaults")
    assert schema_defaults["autoencoder"] == autoencoder.DEFAULTS
    assert schema_defaults["diffusion"] == diffusion.DEFAULTS


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
