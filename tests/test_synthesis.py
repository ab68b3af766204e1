"""Synthesis stage: synthesize and inpaint (RePaint) with tiny random-weight models in pixel and
latent space; determinism, provenance manifest, source selection, error messages."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from histosynth.data.patches import fraction_column
from histosynth.files import content_hash
from histosynth.generators.autoencoder import build_autoencoder
from histosynth.generators.diffusion import Diffusion, build_model, load_diffusion, train_scheduler
from histosynth.generators.inpaint_regions import latent_region, paste_region
from histosynth.generators.sampling import repaint, repaint_scheduler
from histosynth.generators.set_files import SynthesisError, class_grids
from histosynth.generators.synthesis import inpaint, run_stage, synthesize
from histosynth.nuclei.conditioning import read_conditioning, write_conditioning
from histosynth.nuclei.instances import NUCLEUS_CLASSES
from histosynth.training.errors import TrainingError

CLASSES = ["Blood vessel", "Inflammation"]
CONDITIONING = {"regions": True, "nuclei": True, "boundaries": True}
LABELS = {"source": "region", "classes": ["background", *CLASSES], "regions": CLASSES, "background": "background"}
COND_CHANNELS = len(CLASSES) + 1 + len(NUCLEUS_CLASSES) + 1
TINY = {"channels": 8, "multipliers": [1, 2], "attention_head_dim": 8, "norm_groups": 4, "spade_hidden": 8}
SIZE = 16
MANIFEST_COLUMNS = [
    "id",
    "image",
    "mask",
    "conditioning",
    "mode",
    "class",
    "model_path",
    "model_hash",
    "space",
    "sampler",
    "steps",
    "guidance",
    "strength",
    "seed",
    "source_patch_id",
    "donor_patch_id",
    "target_class",
    "label",
    "created_at",
    "frac_blood_vessel",
    "frac_inflammation",
    "split",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- tiny data and models


def write_sources(folder, n_vessel: int = 2, n_clean: int = 3, size: int = SIZE) -> pd.DataFrame:
    """Training patches: n_vessel with a 'Blood vessel' square (class 1), n_clean without one
    (some with 'Inflammation', class 2); random pixels, two nuclei per map."""
    for sub in ("images", "masks", "cond"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_vessel + n_clean):
        pid = f"s{i % 2}_p{i}"
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        if i < n_vessel:
            mask[y : y + size // 2, x : x + size // 2] = 1
        elif i % 2:
            mask[: size // 4] = 2
        encoded = np.zeros((size, size, 3), np.uint8)
        encoded[..., 0] = mask
        for k, (cy, cx) in enumerate(rng.integers(2, size - 3, (2, 2))):
            encoded[cy - 1 : cy + 2, cx - 1 : cx + 2, 1] = k + 1
            encoded[cy - 1 : cy + 2, cx - 1 : cx + 2, 2] = 255
            encoded[cy, cx, 2] = 0
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / "images" / f"{pid}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{pid}.png")
        write_conditioning(encoded, folder / "cond" / f"{pid}.png")
        rows.append(
            {
                "patch_id": pid,
                "slide": f"s{i % 2}",
                "image": str(folder / "images" / f"{pid}.png"),
                "mask": str(folder / "masks" / f"{pid}.png"),
                "conditioning": str(folder / "cond" / f"{pid}.png"),
                **{fraction_column(c): float((mask == j).mean()) for j, c in enumerate(CLASSES, 1)},
                "split": "train",
            }
        )
    return pd.DataFrame(rows)


def save_model(
    folder, *, space="pixel", ae_dir=None, num_classes=0, conditioning="spade", size=SIZE, prediction="epsilon"
):
    """A random-weight model folder as train_diffusion writes it."""
    torch.manual_seed(0)
    channels, inner = 3, size
    if space == "latent":
        config = json.loads((ae_dir / "config.json").read_text())
        channels, inner = config["latent_channels"], size // 2 ** (len(config["block_out_channels"]) - 1)
    model = build_model(
        {**TINY, "conditioning": conditioning, "num_classes": num_classes}, channels, COND_CHANNELS, inner
    )
    model.save_pretrained(folder)
    train_scheduler({"space": space, "prediction": prediction}).save_pretrained(folder)
    ae = {"path": str(ae_dir), "sha256": content_hash(ae_dir)} if space == "latent" else None
    meta = {
        "conditioning": conditioning,
        "space": space,
        "image_channels": 3,
        "image_size": [size, size],
        "cond_channels": COND_CHANNELS,
        "num_classes": num_classes,
        "autoencoder": ae,
    }
    (folder / "histosynth.json").write_text(json.dumps(meta))
    return folder


def save_autoencoder(folder):
    torch.manual_seed(0)
    ae = build_autoencoder(
        {
            "channels": [8, 8, 8],
            "norm_groups": 4,
            "codebook_size": 16,
            "factor": 4,
            "kind": "kl",
            "mid_attention": False,
        },
        3,
        SIZE,
    )
    ae.save_pretrained(folder)
    return folder


@pytest.fixture
def sources(tmp_path):
    return write_sources(tmp_path / "patches")


@pytest.fixture
def pixel_model(tmp_path):
    return save_model(tmp_path / "model", num_classes=len(CLASSES) + 1)


@pytest.fixture
def latent_model(tmp_path):
    return save_model(tmp_path / "latent", space="latent", ae_dir=save_autoencoder(tmp_path / "ae"))


def run_synth(model_dir, sources, out, **kw):
    settings = dict(
        n=3,
        classes=CLASSES,
        labels=LABELS,
        conditioning_cfg=CONDITIONING,
        sampler="ddim",
        steps=2,
        batch_size=2,
        seed=1,
        model_path=model_dir,
        grid_per_class=2,
    )
    return synthesize(load_diffusion(model_dir), sources, out, **{**settings, **kw})


def run_inpaint(model_dir, sources, out, **kw):
    settings = dict(
        n=3,
        target_class="Blood vessel",
        classes=CLASSES,
        labels=LABELS,
        conditioning_cfg=CONDITIONING,
        steps=4,
        jump_length=2,
        jump_n_sample=2,
        batch_size=2,
        seed=1,
        model_path=model_dir,
        grid_per_class=2,
    )
    return inpaint(load_diffusion(model_dir), sources, out, **{**settings, **kw})


def read(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def assert_manifest_matches_files(manifest: pd.DataFrame, out):
    assert list(manifest.columns[: len(MANIFEST_COLUMNS) - 1]) == MANIFEST_COLUMNS[:-1] and "split" in manifest
    on_disk = pd.read_parquet(out / "manifest.parquet")
    pd.testing.assert_frame_equal(on_disk, manifest)
    for row in manifest.itertuples():
        image, mask, encoded = read(out / row.image), read(out / row.mask), read_conditioning(out / row.conditioning)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 and mask.dtype == np.uint8
        assert encoded.shape == (SIZE, SIZE, 3)
        for j, name in enumerate(CLASSES, 1):
            assert getattr(row, fraction_column(name)) == pytest.approx((mask == j).mean())
        fractions = [(mask == j).mean() for j in range(1, len(CLASSES) + 1)]
        assert row.label == (int(np.argmax(fractions)) + 1 if max(fractions) > 0 else 0)
        assert manifest.loc[row.Index, "class"] == LABELS["classes"][row.label]  # the label by name
    assert (manifest["split"] == "synthetic").all() and manifest["id"].is_unique


# ----------------------------------------------------------------------------- synthesize


def test_synthesize_writes_images_masks_maps_manifest_and_grids(tmp_path, sources, pixel_model):
    manifest = run_synth(pixel_model, sources, tmp_path / "out")
    out = tmp_path / "out"
    assert_manifest_matches_files(manifest, out)
    assert (manifest["mode"] == "synth").all() and (manifest["sampler"] == "ddim").all()
    assert (manifest["model_hash"] == content_hash(pixel_model)).all() and (manifest["space"] == "pixel").all()
    assert manifest["donor_patch_id"].isna().all() and manifest["source_patch_id"].is_unique  # 3 of 5: no replacement
    for row in manifest.itertuples():  # the source's label mask and map, unchanged
        source = sources.set_index("patch_id").loc[row.source_patch_id]
        assert np.array_equal(read(out / row.mask), read(source["mask"]))
        assert np.array_equal(read_conditioning(out / row.conditioning), read_conditioning(source["conditioning"]))
    grids = sorted(p.name for p in out.glob("grid_*.png"))
    assert grids and set(grids) <= {"grid_background.png", "grid_blood_vessel.png", "grid_inflammation.png"}
    width, height = Image.open(out / grids[0]).size
    assert height == 3 * (SIZE + 2) + 2  # real, conditioning preview, synthetic
    assert not list(tmp_path.glob(".out.partial"))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_each_sampler_runs_with_guidance(tmp_path, sources, pixel_model, sampler):
    manifest = run_synth(pixel_model, sources, tmp_path / sampler, n=2, sampler=sampler, guidance=2.0, grid_per_class=0)
    assert (manifest["sampler"] == sampler).all() and (manifest["guidance"] == 2.0).all()
    images = [read(tmp_path / sampler / p) for p in manifest["image"]]
    assert all(image.std() > 0 for image in images)
    assert not list((tmp_path / sampler).glob("grid_*.png"))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path, sources, pixel_model):
    a = run_synth(pixel_model, sources, tmp_path / "a", sampler="ddpm", grid_per_class=0)
    b = run_synth(pixel_model, sources, tmp_path / "b", sampler="ddpm", grid_per_class=0)
    c = run_synth(pixel_model, sources, tmp_path / "c", sampler="ddpm", seed=2, grid_per_class=0)
    for rel in a["image"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert any((tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes() for rel in a["image"])
    pd.testing.assert_frame_equal(a.drop(columns="created_at"), b.drop(columns="created_at"))
    assert a["seed"].is_unique and not set(a["seed"]) & set(c["seed"])


def test_more_images_than_target_sources_samples_with_replacement_and_warns(tmp_path, sources, pixel_model, caplog):
    with caplog.at_level(logging.WARNING, logger="histosynth.generators.synthesis"):
        manifest = run_synth(pixel_model, sources, tmp_path / "out", n=5, target_class="Blood vessel", grid_per_class=0)
    assert "with replacement" in caplog.text and "only 2" in caplog.text
    vessel = set(sources.loc[sources["frac_blood_vessel"] > 0, "patch_id"])
    assert len(manifest) == 5 and set(manifest["source_patch_id"]) <= vessel
    assert (manifest["frac_blood_vessel"] > 0).all() and (manifest["target_class"] == "Blood vessel").all()


def test_a_target_class_in_no_training_mask_is_an_error_naming_the_classes(tmp_path, sources, pixel_model):
    no_vessels = sources[sources["frac_blood_vessel"] == 0]
    with pytest.raises(SynthesisError, match=r"'Blood vessel' is absent from all 3 training masks.*Inflammation"):
        run_synth(pixel_model, no_vessels, tmp_path / "out", target_class="Blood vessel")
    with pytest.raises(SynthesisError, match="absent from all"):
        run_inpaint(pixel_model, no_vessels, tmp_path / "out")
    with pytest.raises(SynthesisError, match="not one of the configured classes"):
        run_synth(pixel_model, sources, tmp_path / "out", target_class="Tumour")
    assert not (tmp_path / "out").exists()


def test_latent_model_without_its_autoencoder_fails_clearly(tmp_path, sources, latent_model):
    diffusion = load_diffusion(latent_model)
    bare = Diffusion(diffusion.model, diffusion.scheduler, None, diffusion.meta)
    with pytest.raises(SynthesisError, match="latent-space diffusion model but no autoencoder"):
        synthesize(
            bare, sources, tmp_path / "out", n=1, classes=CLASSES, labels=LABELS, conditioning_cfg=CONDITIONING, steps=1
        )
    shutil.rmtree(tmp_path / "ae")
    with pytest.raises(TrainingError, match="latent-space model trained on the autoencoder"):
        run_synth(latent_model, sources, tmp_path / "out")


def test_latent_synthesis_decodes_to_pixels(tmp_path, sources, latent_model):
    manifest = run_synth(latent_model, sources, tmp_path / "out", n=2, sampler="dpmsolver++", grid_per_class=0)
    assert_manifest_matches_files(manifest, tmp_path / "out")
    assert (manifest["space"] == "latent").all() and (
        manifest["autoencoder_hash"] == content_hash(tmp_path / "ae")
    ).all()


def test_conditioning_settings_other_than_the_models_are_an_error(tmp_path, sources, pixel_model):
    with pytest.raises(SynthesisError, match="trained on 11"):
        run_synth(pixel_model, sources, tmp_path / "out", conditioning_cfg={**CONDITIONING, "boundaries": False})


# ----------------------------------------------------------------------------- inpaint


def test_paste_region_sets_the_class_and_clears_nuclei_inside_only():
    clean = np.zeros((8, 8), np.uint8)
    clean[:, :2] = 2
    encoded = np.stack([clean, np.full((8, 8), 3, np.uint8), np.full((8, 8), 255, np.uint8)], -1)
    donor = np.zeros((8, 8), np.uint8)
    donor[1:4, 1:5] = 1
    mask, edited, region = paste_region(clean, encoded, donor, 1)
    assert region.sum() == 12 and (mask[region] == 1).all() and np.array_equal(mask[~region], clean[~region])
    assert (edited[region] == [1, 0, 0]).all() and np.array_equal(edited[~region], encoded[~region])
    assert encoded[1, 1, 1] == 3  # the input map is not modified


def test_latent_region_covers_every_touched_latent_pixel_plus_a_margin():
    region = torch.zeros(1, 1, 16, 16)
    region[0, 0, 5, 9] = 1  # latent pixel (1, 2) at factor 4
    assert latent_region(region, 4, 0)[0, 0].nonzero().tolist() == [[1, 2]]
    assert latent_region(region, 4, 1)[0, 0].sum() == 9


def test_repaint_keeps_known_pixels_exactly_and_counts_resampling_evaluations():
    torch.manual_seed(0)
    model = build_model(TINY, 3, 4, 16).eval()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    scheduler = repaint_scheduler(train_scheduler({}).config, eta=1.0)
    known = torch.rand(2, 3, 16, 16) * 2 - 1
    keep = torch.ones(2, 1, 16, 16)
    keep[:, :, 4:10, 4:10] = 0
    out = repaint(
        model,
        scheduler,
        known,
        keep,
        torch.rand(2, 4, 16, 16),
        steps=6,
        jump_length=2,
        jump_n_sample=3,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
    )
    assert torch.equal(out[keep.expand_as(out) == 1], known[keep.expand_as(known) == 1])
    assert not torch.allclose(out[:, :, 4:10, 4:10], known[:, :, 4:10, 4:10])
    # T = 6 denoising steps, plus 2 jumps (at t = 2 and 4) each re-denoising jump_length = 2 steps jump_n_sample - 1 = 2 times
    assert len(calls) == 6 + 2 * 2 * 2
    assert len(scheduler.timesteps) == len(calls) + 2 * 2 * 2  # denoising steps + re-noising (jump) steps


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_inpainting_changes_only_the_pasted_region(tmp_path, sources, space):
    model_dir = (
        save_model(tmp_path / "m", num_classes=len(CLASSES) + 1)
        if space == "pixel"
        else save_model(tmp_path / "m", space="latent", ae_dir=save_autoencoder(tmp_path / "ae"))
    )
    manifest = run_inpaint(model_dir, sources, tmp_path / "out", guidance=1.5 if space == "pixel" else 1.0)
    out = tmp_path / "out"
    assert_manifest_matches_files(manifest, out)
    by_id = sources.set_index("patch_id")
    assert (manifest["mode"] == "inpaint").all() and (manifest["sampler"] == "repaint").all()
    assert (manifest["jump_length"] == 2).all() and (manifest["space"] == space).all()
    for row in manifest.itertuples():
        clean, donor = by_id.loc[row.source_patch_id], by_id.loc[row.donor_patch_id]
        assert clean["frac_blood_vessel"] == 0 and donor["frac_blood_vessel"] > 0
        region = read(donor["mask"]) == 1
        mask, encoded, image = read(out / row.mask), read_conditioning(out / row.conditioning), read(out / row.image)
        assert (mask[region] == 1).all() and np.array_equal(mask[~region], read(clean["mask"])[~region])
        assert (encoded[region] == [1, 0, 0]).all()
        source = read(clean["image"])
        assert np.array_equal(image[~region], source[~region])  # the source's bytes outside the region
        assert (image[region] != source[region]).any()
        assert row.frac_blood_vessel == pytest.approx(region.mean())


def test_inpainting_is_deterministic_given_the_seed(tmp_path, sources, pixel_model):
    a = run_inpaint(pixel_model, sources, tmp_path / "a", grid_per_class=0)
    b = run_inpaint(pixel_model, sources, tmp_path / "b", grid_per_class=0)
    c = run_inpaint(pixel_model, sources, tmp_path / "c", seed=5, grid_per_class=0)
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in a["image"])
    assert [(tmp_path / "a" / p).read_bytes() for p in a["image"]] != [
        (tmp_path / "c" / p).read_bytes() for p in c["image"]
    ]
    pd.testing.assert_frame_equal(a.drop(columns="created_at"), b.drop(columns="created_at"))


def test_inpainting_needs_clean_patches_and_a_target_class(tmp_path, sources, pixel_model, caplog):
    with pytest.raises(SynthesisError, match="needs a target class"):
        run_inpaint(pixel_model, sources, tmp_path / "out", target_class=None)
    with pytest.raises(SynthesisError, match="no clean-tissue patch"):
        run_inpaint(pixel_model, sources[sources["frac_blood_vessel"] > 0], tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="histosynth.generators.synthesis"):
        manifest = run_inpaint(pixel_model, sources, tmp_path / "out", n=4, steps=2, jump_n_sample=1, grid_per_class=0)
    assert "only 3 clean-tissue patches" in caplog.text and len(manifest) == 4


def test_class_grids_are_written_per_target_class(tmp_path, sources, pixel_model):
    manifest = run_inpaint(pixel_model, sources, tmp_path / "out", grid_per_class=0)
    paths = class_grids(manifest, tmp_path / "out", sources, tmp_path / "grids", per_class=2)
    assert [p.name for p in paths] == ["grid_blood_vessel.png"]
    assert Image.open(paths[0]).size == (2 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)


def test_run_stage_reads_conditioning_indexes_and_runs_both_modes(tmp_path, sources, pixel_model):
    index = sources.copy()
    for column in ("image", "mask", "conditioning"):  # stored relative to the index, as the workflow writes them
        index[column] = [str(Path(p).relative_to(tmp_path / "patches")) for p in index[column]]
    index.loc[0, "split"] = "test"  # a held-out patch is never a source
    index.to_parquet(tmp_path / "patches" / "index.parquet")
    settings = {
        "batch_size": 2,
        "grid_per_class": 1,
        "synthesize": {"n": 2, "steps": 1},
        "inpaint": {"n": 2, "target_class": "Blood vessel", "steps": 2, "jump_length": 1, "jump_n_sample": 2},
    }
    for mode in ("synth", "inpaint"):
        manifest = run_stage(
            mode,
            pixel_model,
            [tmp_path / "patches" / "index.parquet"],
            tmp_path / mode,
            settings=settings,
            classes=CLASSES,
            labels=LABELS,
            conditioning_cfg=CONDITIONING,
            seed=0,
            device="cpu",
        )
        assert (manifest["mode"] == mode).all() and len(manifest) == 2
        assert index.loc[0, "patch_id"] not in set(manifest["source_patch_id"]) | set(
            manifest["donor_patch_id"].dropna()
        )
        assert (tmp_path / mode / "manifest.parquet").is_file() and list((tmp_path / mode).glob("grid_*.png"))


def test_strength_below_one_keeps_the_source_and_is_recorded(tmp_path, sources, pixel_model):
    light = run_synth(pixel_model, sources, tmp_path / "light", steps=20, strength=0.05, grid_per_class=0)
    full = run_synth(pixel_model, sources, tmp_path / "full", steps=20, grid_per_class=0)
    assert (light["strength"] == 0.05).all() and (full["strength"] == 1.0).all()
    by_id = sources.set_index("patch_id")

    def distance(manifest, out):
        return np.mean(
            [
                np.abs(read(out / row.image).astype(float) - read(by_id.loc[row.source_patch_id, "image"])).mean()
                for row in manifest.itertuples()
            ]
        )

    assert distance(light, tmp_path / "light") < 0.5 * distance(full, tmp_path / "full")
    with pytest.raises(SynthesisError, match="strength"):
        run_synth(pixel_model, sources, tmp_path / "bad", strength=1.5)


def test_repaint_with_a_v_prediction_model_keeps_known_pixels(tmp_path, sources):
    model_dir = save_model(tmp_path / "v", num_classes=len(CLASSES) + 1, prediction="v_prediction")
    manifest = run_inpaint(model_dir, sources, tmp_path / "out", grid_per_class=0)
    by_id = sources.set_index("patch_id")
    for row in manifest.itertuples():
        region = read(by_id.loc[row.donor_patch_id, "mask"]) == 1
        image, source = read(tmp_path / "out" / row.image), read(by_id.loc[row.source_patch_id, "image"])
        assert np.array_equal(image[~region], source[~region]) and (image[region] != source[region]).any()


def test_class_balance_draws_rare_classes_as_often_as_common_ones(tmp_path, sources, pixel_model):
    # Sources: 2 vessel maps, 1 inflammation map, 2 maps of no class; 200 draws with replacement.
    rare = sources[sources["frac_inflammation"] > 0]["patch_id"].tolist()
    counts = {}
    for balance in (0.0, 1.0):
        manifest = run_synth(
            pixel_model,
            sources,
            tmp_path / f"b{balance}",
            n=200,
            steps=1,
            batch_size=100,
            class_balance=balance,
            grid_per_class=0,
        )
        counts[balance] = manifest["source_patch_id"].isin(rare).sum()
    assert counts[0.0] < 55 < counts[1.0]  # expected 40 (1 of 5 maps) vs 67 (1 of 3 classes), sd ~6
    assert counts[1.0] < 85


def test_grow_regenerates_a_band_around_the_region_and_keeps_the_mask(tmp_path, sources, pixel_model):
    from scipy.ndimage import binary_dilation

    plain = run_inpaint(pixel_model, sources, tmp_path / "plain", grid_per_class=0)
    grown = run_inpaint(pixel_model, sources, tmp_path / "grown", grow=2, grid_per_class=0)
    by_id = sources.set_index("patch_id")
    band_changed = 0
    for a, b in zip(plain.itertuples(), grown.itertuples(), strict=True):
        assert (a.source_patch_id, a.donor_patch_id) == (b.source_patch_id, b.donor_patch_id)
        region = read(by_id.loc[b.donor_patch_id, "mask"]) == 1
        wide = binary_dilation(region, np.ones((5, 5), bool))  # 2 px in every direction, as a square
        assert wide.sum() > region.sum()
        source, image = read(by_id.loc[b.source_patch_id, "image"]), read(tmp_path / "grown" / b.image)
        assert np.array_equal(image[~wide], source[~wide])  # only the grown area is regenerated
        band = wide & ~region
        band_changed += int((image[band] != source[band]).any(-1).sum())
        # the label mask and the map are the pasted region's, not the grown area's
        assert np.array_equal(read(tmp_path / "grown" / b.mask), read(tmp_path / "plain" / a.mask))
        assert b.frac_blood_vessel == pytest.approx(region.mean())
    assert band_changed > 0


def test_donor_min_fraction_picks_donors_with_more_of_the_class(tmp_path, sources, pixel_model):
    # one donor keeps an 8 x 8 vessel (fraction 0.25), the other is cut down to 2 x 2 (fraction 1/64)
    sources = sources.copy()
    small = sources.index[sources["frac_blood_vessel"] > 0][0]
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[3:5, 3:5] = 1
    Image.fromarray(mask).save(sources.loc[small, "mask"])
    sources.loc[small, "frac_blood_vessel"] = 4 / SIZE**2
    small_id = sources.loc[small, "patch_id"]
    fast = dict(n=8, steps=2, jump_n_sample=1, batch_size=8, grid_per_class=0)
    every = run_inpaint(pixel_model, sources, tmp_path / "every", **fast)
    assert small_id in set(every["donor_patch_id"]) and len(set(every["donor_patch_id"])) == 2
    big = run_inpaint(pixel_model, sources, tmp_path / "big", donor_min_fraction=0.2, **fast)
    assert set(big["donor_patch_id"]) == set(sources.loc[sources["frac_blood_vessel"] > 0.2, "patch_id"])
    assert (big["frac_blood_vessel"] == 0.25).all()
    with pytest.raises(SynthesisError, match=r"no donor patch has frac_blood_vessel > 0.25 \(max 0.250\)"):
        run_inpaint(pixel_model, sources, tmp_path / "none", donor_min_fraction=0.25, **fast)  # more than, not at least


def test_eta_sets_the_repaint_noise_and_changes_only_the_region(tmp_path, sources, pixel_model, monkeypatch):
    from histosynth.generators import synthesis

    made = []
    real_scheduler = synthesis.repaint_scheduler
    monkeypatch.setattr(
        synthesis, "repaint_scheduler", lambda config, eta: made.append(real_scheduler(config, eta)) or made[-1]
    )
    ddpm = run_inpaint(pixel_model, sources, tmp_path / "ddpm", eta=1.0, grid_per_class=0)
    ddim = run_inpaint(pixel_model, sources, tmp_path / "ddim", eta=0.0, grid_per_class=0)
    assert [s.config.eta for s in made] == [1.0, 0.0]
    by_id = sources.set_index("patch_id")
    differ = False
    for a, b in zip(ddpm.itertuples(), ddim.itertuples(), strict=True):
        region = read(by_id.loc[a.donor_patch_id, "mask"]) == 1
        x, y = read(tmp_path / "ddpm" / a.image), read(tmp_path / "ddim" / b.image)
        assert np.array_equal(x[~region], y[~region])
        differ |= bool((x[region] != y[region]).any())
    assert differ  # same seed, same noise draws: only the posterior noise differs


def test_per_class_synthesis_draws_maps_of_each_label_and_records_it(tmp_path, sources, pixel_model):
    manifest = run_synth(
        pixel_model, sources, tmp_path / "out", per_class={"Blood vessel": 2, "background": 1}, grid_per_class=0
    )
    assert list(manifest["class"]) == ["background", "Blood vessel", "Blood vessel"]  # in the labels' order
    assert list(manifest["label"]) == [0, 1, 1]
    by_id = sources.set_index("patch_id")
    for row in manifest.itertuples():  # each map comes from a training patch of the image's label
        fractions = by_id.loc[row.source_patch_id, ["frac_blood_vessel", "frac_inflammation"]].to_numpy(float)
        assert (
            LABELS["classes"][int(np.argmax(fractions)) + 1 if fractions.max() > 0 else 0]
            == manifest.loc[row.Index, "class"]
        )
    with pytest.raises(SynthesisError, match="not among the labels"):
        run_synth(pixel_model, sources, tmp_path / "bad", per_class={"Tumour": 1}, grid_per_class=0)


def test_sheet_labels_condition_synthesis_on_the_source_image_label(tmp_path, sources):
    model = save_model(tmp_path / "sheet_model", num_classes=2)
    labelled = sources.assign(label=["1" if slide == "s0" else "2" for slide in sources["slide"]])
    sheet = {"source": "sheet", "classes": ["1", "2"], "regions": CLASSES, "background": "background"}
    manifest = run_synth(model, labelled, tmp_path / "out", labels=sheet, per_class={"2": 2}, grid_per_class=1)
    assert list(manifest["class"]) == ["2", "2"] and list(manifest["label"]) == [1, 1]
    assert set(labelled.set_index("patch_id").loc[manifest["source_patch_id"], "slide"]) == {"s1"}
    assert [p.name for p in (tmp_path / "out").glob("grid_*.png")] == ["grid_2.png"]
