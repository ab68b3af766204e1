import pytest
import yaml

from histosynth.config import (
    CONFIG_SCHEMA,
    ConfigError,
    key_table,
    load_config,
    load_preset,
    read_slide_sheet,
    section_defaults,
    validated,
)

from conftest import REPO


def schema_keys(properties, prefix=""):
    for key, sub in properties.items():
        if sub.get("type") == "object" and "properties" in sub:
            yield from schema_keys(sub["properties"], f"{prefix}{key}.")
        else:
            yield prefix + key


def schema_properties(properties, prefix=""):
    """Every (dotted key, schema) of the config, objects and their properties alike."""
    for key, sub in properties.items():
        yield prefix + key, sub
        if "properties" in sub:
            yield from schema_properties(sub["properties"], f"{prefix}{key}.")


def test_every_key_has_a_default_a_description_and_documentation():
    schema = yaml.safe_load(CONFIG_SCHEMA.read_text())
    properties = dict(schema_properties(schema["properties"]))
    assert len(properties) > 100 and "patches.tissue.mpp" in properties  # the walk reaches nested sections
    missing = [key for key, sub in properties.items() if "default" not in sub]
    assert not missing, f"schema keys without a default: {missing}"
    undocumented = [
        key
        for key, sub in properties.items()
        if "properties" not in sub and not " ".join(sub.get("description", "").split())
    ]
    assert not undocumented, f"schema keys without a description: {undocumented}"
    for key in schema_keys(schema["properties"]):
        assert f"| `{key}` |" in key_table()
    assert key_table() in (REPO / "config/README.md").read_text(), "regenerate: python -m histosynth.config"
    defaults = load_config()
    assert defaults["patches"]["tissue"]["mpp"] == 8.0 and defaults["classes"][0] == "Blood vessel"


@pytest.mark.parametrize("preset", ["config.yaml", "tiny.yaml", "thesis.yaml", "real_cpu.yaml"])
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
        # YAML's `{0: Fat}` has an integer key, which the schema's key pattern does not see
        (
            {"annotations": {"mask_values": {0: "Fat", 1: "Fat"}}},
            r"annotations.mask_values maps \[0\].*0 is background",
        ),
        ({"annotations": {"mask_values": {-2: "Fat"}}}, r"annotations.mask_values maps \[-2\]"),
        ({"annotations": {"mask_values": {"x": "Fat"}}}, r"annotations.mask_values: 'x' does not match"),
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


def test_section_defaults_are_the_schema_defaults_with_overrides_merged():
    schema = yaml.safe_load(CONFIG_SCHEMA.read_text())["properties"]
    nuclei = section_defaults("nuclei")
    properties = schema["nuclei"]["properties"]
    assert nuclei == {key: sub["default"] for key, sub in properties.items() if key != "train"} | {
        "train": {key: sub["default"] for key, sub in properties["train"]["properties"].items()}
    }
    assert nuclei == validated({}, "defaults")["nuclei"]
    nuclei["mpp"] = 99.0  # a fresh copy each call: mutating one cannot change the next
    assert section_defaults("nuclei")["mpp"] == schema["nuclei"]["properties"]["mpp"]["default"] == 0.5

    train = schema["diffusion"]["properties"]["train"]["properties"]
    diffusion = section_defaults("diffusion", {"channels": 8, "train": {"steps": 7}})
    assert diffusion["channels"] == 8 and diffusion["train"]["steps"] == 7
    # a nested override replaces only its own keys: the rest of the train section keeps its defaults
    assert diffusion["train"] == {key: sub["default"] for key, sub in train.items()} | {"steps": 7}
    assert diffusion["multipliers"] == schema["diffusion"]["properties"]["multipliers"]["default"]
    tissue = schema["patches"]["properties"]["tissue"]["properties"]
    assert section_defaults("patches", {"tissue": {"mpp": 4.0}})["tissue"] == {
        key: sub["default"] for key, sub in tissue.items()
    } | {"mpp": 4.0}


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("nuclei", {"mpp": -1}, r"nuclei settings: nuclei.mpp: -1 is less than or equal to the minimum of 0"),
        ("nuclei", {"tile": 16}, r"nuclei settings: nuclei.tile: 16 is less than the minimum of 32"),
        ("nuclei", {"model_classes": {"T": "tumour"}}, r"nuclei.model_classes.T: 'tumour' is not one of"),
        ("diffusion", {"train": {"steps": "many"}}, r"diffusion.train.steps: 'many' is not of type 'integer'"),
        ("patches", {"tisue": {}}, r"patches settings: patches: Additional properties are not allowed \('tisue'"),
    ],
)
def test_section_defaults_validate_the_overrides(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        section_defaults(name, overrides)


def flat(config, prefix=""):
    """{dotted key: value} of a config's leaves (lists are leaves: presets replace them)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= flat(value, f"{prefix}{key}.")
        elif prefix + key == "mixing.ratios":
            out[prefix + key] = [{"real": True} | ratio for ratio in value]  # the schema fills each ratio's `real`
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("preset", ["demo", "tiny", "thesis"])
def test_presets_layer_on_the_default(preset):
    base = flat(yaml.safe_load((REPO / "config/config.yaml").read_text()))
    layer = {} if preset == "demo" else flat(yaml.safe_load((REPO / "config" / f"{preset}.yaml").read_text()))
    config = load_preset(preset)
    merged = flat(config)
    for key, value in layer.items():
        assert merged[key] == value, f"{preset}: {key} is not the preset's value"
    for key, value in base.items():
        if key not in layer:
            assert merged[key] == value, f"{preset}: {key} lost config.yaml's value"
    if preset != "demo":
        assert [key for key in layer if key in base and layer[key] != base[key]], "the preset overrides nothing"
    # literal checks of the layering: config.yaml differs from the schema default in each of these
    assert section_defaults("diffusion")["prediction"] == "epsilon" and section_defaults("patches")["size"] == 64
    assert config["priority"] == ["Blood vessel", "Inflammation", "Fat"]  # schema default []
    assert config["classes"] == ["Blood vessel", "Inflammation", "Fat"] and config["diffusion"]["num_classes"] == 4
    expected = {
        "demo": (64, "v_prediction", 1.0, 1000, 2.0),
        "tiny": (32, "v_prediction", 1.0, 4, 2.0),
        "thesis": (256, "epsilon", 0.0, 940000, 1.0),
    }[preset]
    # tiny's diffusion.train sets steps but not class_balance: the nested dicts merge key by key
    assert (
        config["patches"]["size"],
        config["diffusion"]["prediction"],
        config["diffusion"]["train"]["class_balance"],
        config["diffusion"]["train"]["steps"],
        config["synthesis"]["inpaint"]["guidance"],
    ) == expected


def test_thesis_preset_is_the_thesis():
    thesis = load_preset("thesis")
    assert (thesis["patches"]["size"], thesis["patches"]["stride"], thesis["patches"]["min_tissue"]) == (256, 128, 0.5)
    assert thesis["diffusion"]["train"]["batch_size"] == 16 and thesis["diffusion"]["train"]["lr"] == 2e-4
    assert len(thesis["diffusion"]["multipliers"]) - 1 == 4  # four downsamplings


def test_num_classes_and_per_class_must_fit_the_labels():
    region = r"number of labels \(4: \['background', 'Blood vessel', 'Inflammation', 'Fat'\]\), got 3"
    with pytest.raises(ConfigError, match=r"my.yaml: diffusion.num_classes must be 0 .*" + region):
        validated({"labels": {"source": "region"}, "diffusion": {"num_classes": 3}}, "my.yaml")
    with pytest.raises(ConfigError, match=r"number of labels \(2: \['1', '2'\]\), got 4"):
        validated({"labels": {"source": "sheet", "classes": ["1", "2"]}, "diffusion": {"num_classes": 4}}, "my.yaml")
    with pytest.raises(ConfigError, match=r"per_class names \['3'\], which are not labels"):
        validated(
            {
                "labels": {"source": "sheet", "classes": ["1", "2"]},
                "synthesis": {"synthesize": {"per_class": {"1": 4, "3": 4}}},
            },
            "my.yaml",
        )
    # auto without labels.classes: the sheet decides, and the workflow checks once it has read it
    assert validated({"diffusion": {"num_classes": 3}}, "my.yaml")["diffusion"]["num_classes"] == 3


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"mixing": {"ratios": [{"name": "a", "synthetic": 1}, {"name": "a", "synthetic": 0}]}}, "repeated: a"),
        ({"mixing": {"ratios": [{"name": "a b", "synthetic": 1}]}}, r"mixing.ratios.0.name: 'a b' does not match"),
        (
            {"mixing": {"ratios": [{"name": "a", "synthetic": -1}]}},
            "mixing.ratios.0.synthetic: -1 is less than the minimum",
        ),
        ({"mixing": {"sources": ["inpaint"]}}, "synthesis.inpaint.target_class is null"),
        (
            {"report": {"baseline": "nope"}},
            r"report.baseline 'nope' is not one of mixing.ratios \['real', 'syn50', 'syn100'\]",
        ),
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

    ratios = [
        {"name": "synonly", "synthetic": 8, "real": False},
        {"name": "syn4", "synthetic": 4},
        {"name": "real", "synthetic": 0},
    ]
    assert baseline_ratio(ratios) == "real"
    assert baseline_ratio(ratios, "syn4") == "syn4"
    assert baseline_ratio(ratios[:2]) == "synonly"


def test_config_paths_resolve_in_the_working_directory_then_the_workflows(tmp_path):
    from histosynth.config import config_path

    here, workflow = tmp_path / "here", tmp_path / "workflow"
    for folder in (here, workflow):
        (folder / "config").mkdir(parents=True)
    (workflow / "config" / "slides.tsv").write_text("slide\n")
    assert config_path("config/slides.tsv", here, workflow) == workflow / "config" / "slides.tsv"
    (here / "config" / "slides.tsv").write_text("slide\n")
    assert config_path("config/slides.tsv", here, workflow) == here / "config" / "slides.tsv"
    assert config_path("config/absent.tsv", here, workflow) == workflow / "config" / "absent.tsv"
    assert config_path(tmp_path / "elsewhere.tsv", here, workflow) == tmp_path / "elsewhere.tsv"
