"""Tests for histosynth.nuclei.learned and learned_export: training targets, seeded crops, the exported detector's
decoding on known output maps, and a tiny model trained on drawn nuclei that then finds them."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage.draw import disk

from histosynth.config import section_defaults
from histosynth.nuclei.instances import NucleiError
from histosynth.nuclei.learned import CropDataset, slide_training_samples, train_on_folder, training_targets
from histosynth.nuclei.learned_export import _Detector
from histosynth.nuclei.metrics import score_instances
from histosynth.nuclei.model import load_detector
from histosynth.nuclei.stage import segment_patch

from conftest import write_tiled_tiff

EOSIN, HEMATOXYLIN = (214, 120, 170), (80, 50, 140)


def two_touching_squares():
    instances = np.zeros((12, 20), np.int64)
    instances[2:9, 2:9] = 1
    instances[2:9, 9:16] = 2
    return instances


def test_training_targets():
    instances = two_touching_squares()
    fg, boundary, distance, classes = training_targets(instances, {1: 0, 2: 3})
    assert (fg == (instances > 0)).all()
    # the ring of each square, including where the two meet (columns 8 and 9)
    assert boundary[5, 8] == boundary[5, 9] == 1 and boundary[5, 5] == 0 and boundary[2, 4] == 1
    assert boundary[instances == 0].sum() == 0
    # distance: 1 at each square's centre, lowest on its ring, 0 off nuclei
    assert distance[5, 5] == 1.0 and distance[5, 12] == 1.0
    assert 0 < distance[2, 4] < distance[4, 5] < 1 and distance[0, 0] == 0
    assert classes[5, 5] == 0 and classes[5, 12] == 3 and classes[0, 0] == -1


def test_crops_are_seeded_by_index():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)]
    targets = [training_targets(np.pad(two_touching_squares(), ((0, 28), (0, 30))))]
    data = CropDataset(images, targets, 16, 100, seed=1)
    a, b = data[7], data[7]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert a["image"].shape == (3, 16, 16) and a["target"].shape == (4, 16, 16)
    assert not torch.equal(data[7]["image"], data[8]["image"])
    assert not torch.equal(data[7]["image"], CropDataset(images, targets, 16, 100, seed=2)[7]["image"])


def test_crops_hang_over_the_image_edge_as_inference_pads_it():
    """Beyond the image a crop is white (detect_with_model's padding) and background in every target."""
    image = np.full((40, 40, 3), 100, np.uint8)
    instances = np.zeros((40, 40), np.int64)
    instances[10:30, 10:30] = 1
    data = CropDataset([image], [training_targets(instances, {1: 0})], 16, 200, seed=0, augment=False)
    over = 0
    for i in range(200):
        pixels, target = data[i]["image"].numpy(), data[i]["target"].numpy()
        outside = (pixels == 1.0).all(0)
        assert np.allclose(pixels[:, ~outside], 100 / 255)
        assert (target[:3, outside] == 0).all() and (target[3, outside] == -1).all()
        assert outside.all(1).sum() <= 4 and outside.all(0).sum() <= 4  # at most crop // 4 rows or columns over
        over += outside.any()
    assert 0 < over < 200


class KnownMaps(torch.nn.Module):
    """Stands in for the U-Net: outputs fixed logits (foreground, boundary, distance, 2 classes)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits[None]


def test_detector_decodes_touching_nuclei_by_flooding():
    instances = two_touching_squares()
    fg, boundary, distance, _ = training_targets(instances)
    logit = lambda p: torch.logit(torch.tensor(p, dtype=torch.float32).clamp(1e-4, 1 - 1e-4))  # noqa: E731
    classes = np.stack([instances == 1, instances == 2]).astype(np.float32) * 8  # square 1: "immune", 2: "tumor"
    maps = torch.cat([logit(fg)[None], logit(boundary)[None], logit(distance)[None], torch.from_numpy(classes)])
    detector = torch.jit.script(_Detector(KnownMaps(maps), ["immune", "tumor"], 0.5, 4))
    found, names, scores = detector(torch.zeros(1, 3, *instances.shape))
    assert found.shape == instances.shape and int(found.max()) == 2
    # flooding from the two seeds gives every foreground pixel, the shared ring split between them
    assert ((found > 0) == (instances > 0)).all()
    by_truth = {int(np.bincount(found.numpy()[instances == k]).argmax()): k for k in (1, 2)}
    assert sorted(by_truth) == [1, 2]
    assert [names[i - 1] for i in sorted(by_truth, key=by_truth.get)] == ["immune", "tumor"]
    assert all(s > 0.99 for s in scores)
    assert score_instances([(instances, found.numpy())])["f1"] == 1.0


def drawn_tile(seed: int, size: int = 96):
    """Pink tile with 12 non-overlapping hematoxylin discs of radius 5 px and its instances."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((size, size, 3), np.float32)
    rgb[:] = EOSIN
    truth = np.zeros((size, size), np.int32)
    k = 0
    while k < 12:
        c = rng.integers(8, size - 8, 2)
        rr, cc = disk(tuple(c), 5, shape=truth.shape)
        if truth[max(0, c[0] - 7) : c[0] + 8, max(0, c[1] - 7) : c[1] + 8].any():
            continue
        k += 1
        rgb[rr, cc] = HEMATOXYLIN
        truth[rr, cc] = k
    rgb += rng.normal(0, 5, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), truth


def test_tiny_model_trains_exports_and_finds_nuclei(tmp_path, caplog):
    images, annotations = tmp_path / "images", tmp_path / "annotations"
    images.mkdir(), annotations.mkdir()
    for i in range(3):
        rgb, truth = drawn_tile(i)
        Image.fromarray(rgb).save(images / f"t{i}.png")
        Image.fromarray(truth.astype(np.uint16)).save(annotations / f"t{i}.png")
    params = section_defaults(
        "nuclei",
        {
            "train": {
                "mpp": 0.5,
                "crop": 32,
                "steps": 150,
                "batch_size": 8,
                "lr": 3e-3,
                "lr_warmup": 0,
                "encoder_depth": 3,
                "decoder_channels": [16, 16, 16],
                "checkpoint_every": 75,
                "log_every": 25,
            }
        },
    )
    out = tmp_path / "model"
    table = train_on_folder(images, annotations, 0.5, out, params, seed=0, holdout=["t2"])
    assert list(table["split"]) == ["train", "train", "holdout"]
    assert (table["f1"] >= 0.8).all(), table
    assert (out / "loss.csv").is_file() and (out / "scores.csv").is_file()
    loss = np.loadtxt(out / "loss.csv", delimiter=",", skiprows=1, usecols=0)
    assert loss[-1] == 150
    # the file is a detector of histosynth's contract declaring its resolution
    model = load_detector(out)
    assert model.kind == "contract" and model.mpp == 0.5
    rgb, truth = drawn_tile(7, 128)
    big = np.asarray(Image.fromarray(rgb).resize((256, 256), Image.Resampling.LANCZOS))  # the same tile at 0.25 mpp
    found, nuclei = segment_patch(big, 0.25, (128, 128), params, model)
    assert score_instances([(truth, found)])["f1"] >= 0.8
    assert set(nuclei["class"]) == {"other"}
    extra = {"histosynth.json": ""}
    torch.jit.load(str(out / "model.pt"), _extra_files=extra)
    meta = json.loads(extra["histosynth.json"])
    assert meta["kind"] == "histosynth-nuclei" and meta["data"]["holdout"] == ["t2"] and meta["steps"] == 150


def test_train_on_folder_errors(tmp_path):
    images, annotations = tmp_path / "images", tmp_path / "annotations"
    images.mkdir(), annotations.mkdir()
    rgb, truth = drawn_tile(0)
    Image.fromarray(rgb).save(images / "a.png")
    params = section_defaults("nuclei")
    with pytest.raises(NucleiError, match="no annotation .* for a.png"):
        train_on_folder(images, annotations, 0.5, tmp_path / "m", params, seed=0)
    Image.fromarray(truth.astype(np.uint16)).save(annotations / "a.png")
    with pytest.raises(NucleiError, match="every image is held out"):
        train_on_folder(images, annotations, 0.5, tmp_path / "m", params, seed=0, holdout=["a"])
    with pytest.raises(NucleiError, match=r"--holdout names \['b'\]"):
        train_on_folder(images, annotations, 0.5, tmp_path / "m", params, seed=0, holdout=["b"])


def test_slide_samples_read_their_nuclei_and_name_the_file_of_an_unknown_class(tmp_path):
    rgb = np.full((256, 256, 3), EOSIN, np.uint8)
    slide = write_tiled_tiff(tmp_path / "s.tiff", rgb, mpp=0.5, levels=1)
    index = pd.DataFrame({"x": [0], "y": [0], "size": [64], "mpp": [1.0], "slide_mpp": [0.5]})

    def truth(name):
        ring = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]  # level-0 px: 10 x 10 px at 1.0 mpp
        properties = {"classification": {"name": name}}
        return {
            "type": "FeatureCollection",
            "features": [
                {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": properties}
            ],
        }

    [(image, instances, names)] = slide_training_samples(index, slide, truth("immune"), 1.0, source="s.geojson")
    assert image.shape == (64, 64, 3) and names == ["immune"]
    assert instances.max() == 1 and 80 <= (instances == 1).sum() <= 121
    with pytest.raises(NucleiError, match=r"s\.geojson: nucleus classes \['Tumour'\] are not among"):
        slide_training_samples(index, slide, truth("Tumour"), 1.0, source="s.geojson")
