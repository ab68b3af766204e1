"""Tests for histosynth.nuclei.hdyolo through load_detector: a scripted stand-in for a released
HD-Yolo file, tiled and stitched, without masks, with unlabeled detections, at another mpp and
with NMS overrides; and the project's own contract beside it."""

import numpy as np
import pytest
import torch
import torchvision
from skimage.draw import disk

from histosynth.config import section_defaults
from histosynth.nuclei.hdyolo import HD_WSI_NMS_PARAMS, Detections, detect_hdyolo, paste_instances, tile_detections
from histosynth.nuclei.instances import TABLE_COLUMNS, NucleiError
from histosynth.nuclei.metrics import match_instances
from histosynth.nuclei.model import detect_with_model, load_detector
from histosynth.nuclei.stage import detector_settings, segment_patch

EOSIN = (214, 120, 170)
FILE_NMS = {"conf_thres": 0.15, "iou_thres": 0.45, "max_det": 300.0}  # a released file's own defaults


# The stand-in has the interface of a released HD-Yolo file as /work/shared/reference/hd-yolo.md
# documents it (read from impromptuRong/hd_wsi): scripted from fp16 weights on the CPU;
# headers.det.nms_params a Dict[str, float]; `_, outputs = model(x, compute_masks=True)` on an
# N x 3 x H x W tensor of the model's dtype; outputs[i]["det"] with boxes (N x 4 xyxy float),
# scores (fp16), labels (int64, 1..7 or -100) and masks (N x 1 x 28 x 28) only when N > 0 and
# compute_masks. Its "detector": pixels with red < 0.5 and green > 0.25 are nuclei (so neither
# eosin nor the black padding is), 8-connected components; the box spans a component's pixels;
# score = pixel area / 1000; label = round(10 * mean blue), -100 outside 1..7; the mask is the
# component roi-aligned to 28 x 28 over its box.
class Det(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.nms_params: dict[str, float] = dict(FILE_NMS)

    def forward(self, image: torch.Tensor, compute_masks: bool) -> dict[str, torch.Tensor]:
        nuclear = ((image[0] < 0.5) & (image[1] > 0.25)).float()
        h, w = nuclear.shape
        labels = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w) * nuclear
        while True:
            grown = torch.nn.functional.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * nuclear
            if torch.equal(grown, labels):
                break
            labels = grown
        ids = torch.unique(labels)
        ids = ids[ids > 0]
        boxes: list[torch.Tensor] = []
        scores: list[float] = []
        classes: list[int] = []
        regions = torch.zeros((ids.shape[0], 1, h, w))
        for k in range(ids.shape[0]):
            region = labels == ids[k]
            points = torch.nonzero(region)
            ys, xs = points[:, 0], points[:, 1]
            boxes.append(torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float())
            scores.append(min(points.shape[0] / 1000.0, 1.0))
            code = int(torch.round(image[2][region].mean() * 10))
            classes.append(code if 1 <= code <= 7 else -100)
            regions[k, 0] = region.float()
        box_t = torch.stack(boxes) if len(boxes) > 0 else torch.zeros((0, 4))
        score_t = torch.tensor(scores, dtype=torch.float32)
        keep = torch.nonzero(score_t >= self.nms_params["conf_thres"])[:, 0]
        keep = keep[torchvision.ops.nms(box_t[keep], score_t[keep], self.nms_params["iou_thres"])]
        keep = keep[: int(self.nms_params["max_det"])]
        det = {
            "boxes": box_t[keep],
            "scores": score_t[keep].half(),
            "labels": torch.tensor(classes, dtype=torch.int64)[keep],
        }
        if compute_masks and keep.shape[0] > 0:
            rois = torch.cat(
                [
                    torch.arange(keep.shape[0], dtype=torch.float32)[:, None],
                    box_t[keep] + torch.tensor([0.0, 0.0, 1.0, 1.0]),
                ],
                1,
            )
            det["masks"] = torchvision.ops.roi_align(regions[keep], rois, [28, 28], 1.0, 2, True)
        return det


class Headers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.det = Det()


class HdYoloStandIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 3, 1)  # identity; fp16 like the file's weights
        with torch.no_grad():
            self.stem.weight.copy_(torch.eye(3)[:, :, None, None])
            self.stem.bias.zero_()
        self.headers = Headers()

    def forward(
        self, x: torch.Tensor, compute_masks: bool = True
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, dict[str, torch.Tensor]]]]:
        y = self.stem(x).float()
        outputs: list[dict[str, dict[str, torch.Tensor]]] = []
        for i in range(y.shape[0]):
            outputs.append({"det": self.headers.det(y[i], compute_masks)})
        losses: dict[str, torch.Tensor] = {}
        return losses, outputs


@pytest.fixture(scope="module")
def hdyolo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("hdyolo") / "lung_best.float16.torchscript.pt"
    with pytest.warns(FutureWarning):  # TorchScript is deprecated upstream; the released files are TorchScript
        torch.jit.script(HdYoloStandIn().half()).save(str(path))
    return path


# 128 px cores with 64 px of context: the model sees 256 x 256 inputs
PARAMS = section_defaults("nuclei", {"tile": 128, "pad": 64})


def nucleus_colour(label):
    """RGB of a nucleus the stand-in gives `label` (0 = a blue it maps to -100)."""
    return (51, 102, round(label * 25.5))


def draw(shape, nuclei):
    """Eosin image with discs [(row, col, radius, label)] painted, and the truth instances (disc i has id i + 1)."""
    rgb = np.empty((*shape, 3), np.uint8)
    rgb[:] = EOSIN
    truth = np.zeros(shape, np.int32)
    for i, (row, col, radius, label) in enumerate(nuclei):
        rr, cc = disk((row, col), radius, shape=shape)
        rgb[rr, cc] = nucleus_colour(label)
        truth[rr, cc] = i + 1
    return rgb, truth


def classes_by_truth(truth, instances, table, iou=0.95):
    """{truth id: predicted class} of one-to-one matches above `iou`; asserts every disc is matched once."""
    tp, fp, fn, pairs = match_instances(truth, instances, iou)
    assert (tp, fp, fn) == (int(truth.max()), 0, 0)
    classes = dict(zip(table["instance_id"], table["class"]))
    return {t: classes[p] for t, p, _ in pairs}


def raw_det(path, rgb, compute_masks=True):
    """The stand-in's own outputs[0]["det"] for an image, to check which output case a test exercises."""
    module = load_detector(path).module
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255)
    return module(x, compute_masks=compute_masks)[1][0]["det"]


def test_loads_as_hd_wsi_does(hdyolo_path):
    with pytest.warns(FutureWarning):  # load_detector silences this deprecation
        raw = torch.jit.load(str(hdyolo_path), map_location="cpu")
    assert next(raw.parameters()).dtype == torch.float16  # the file is fp16, as released
    with pytest.raises(RuntimeError, match="should be the same"):  # the real files' error on a float input
        raw(torch.zeros(1, 3, 64, 64))
    model = load_detector(hdyolo_path)
    assert model.kind == "hdyolo" and next(model.module.parameters()).dtype == torch.float32  # .float() on CPU
    assert model.module.headers.det.nms_params == HD_WSI_NMS_PARAMS != FILE_NMS


def test_nucleus_on_a_tile_border_is_counted_once(hdyolo_path):
    shape = (256, 320)  # 2 x 3 cores of 128 px; the last core runs past the image into zeros
    nuclei = [
        (128, 128, 10, 1),  # on a core corner
        (60, 128, 9, 2),
        (128, 200, 9, 3),
        (200, 256, 8, 4),  # on core borders
        (40, 40, 8, 5),
        (200, 60, 11, 6),  # inside cores
        (60, 300, 8, 7),
        (250, 180, 9, 1),
    ]  # inside cores at the image edge, the last one cut by it
    rgb, truth = draw(shape, nuclei)
    model = load_detector(hdyolo_path)
    detections = tile_detections(rgb, model.module, PARAMS, hdyolo_path)
    # one detection per disc, its box the disc's pixel extent in image coordinates
    assert len(detections.boxes) == len(nuclei)
    rows, cols = np.nonzero(truth)
    ids = truth[rows, cols]
    expected = {(cols[ids == i].min(), rows[ids == i].min()) for i in range(1, len(nuclei) + 1)}
    assert {(int(b[0]), int(b[1])) for b in detections.boxes} == expected
    instances, table = detect_with_model(rgb, model, PARAMS)
    assert instances.dtype == np.uint16 and list(table.columns) == list(TABLE_COLUMNS) and len(table) == len(nuclei)
    found = classes_by_truth(truth, instances, table)
    names = ["tumor", "stromal", "immune", "blood", "macrophage", "dead", "other"]
    assert found == {i + 1: names[label - 1] for i, (_, _, _, label) in enumerate(nuclei)}
    areas = np.bincount(truth.ravel())[1:]
    assert np.allclose(np.sort(table["score"]), np.sort(areas / 1000), atol=1e-3)  # scores carried over (fp16)


def test_no_detections(hdyolo_path):
    rgb, _ = draw((100, 140), [])
    assert "masks" not in raw_det(hdyolo_path, rgb)  # the case the reference names: no masks key
    instances, table = detect_with_model(rgb, load_detector(hdyolo_path), PARAMS)
    assert instances.shape == (100, 140) and not instances.any()
    assert table.empty and list(table.columns) == list(TABLE_COLUMNS)


def test_boxes_only_fill_the_inscribed_ellipse(hdyolo_path):
    nuclei = [(40, 40, 12, 1), (90, 100, 10, 3), (128, 64, 11, 2)]  # the last one on a core border
    rgb, truth = draw((160, 160), nuclei)
    assert "masks" not in raw_det(hdyolo_path, rgb, compute_masks=False)
    model = load_detector(hdyolo_path)
    instances, table = detect_hdyolo(rgb, model.module, PARAMS, hdyolo_path, compute_masks=False)
    # ellipses reach IoU 0.93-0.96 with these discs; filled boxes would reach 0.83 and fail
    assert classes_by_truth(truth, instances, table, iou=0.9) == {1: "tumor", 2: "immune", 3: "stromal"}


def test_unlabeled_detections_are_other(hdyolo_path):
    nuclei = [(40, 40, 9, 0), (40, 100, 9, 7), (100, 60, 9, 2)]  # blue 0: the stand-in labels it -100
    rgb, truth = draw((140, 140), nuclei)
    assert sorted(raw_det(hdyolo_path, rgb)["labels"].tolist()) == [-100, 2, 7]
    instances, table = detect_with_model(rgb, load_detector(hdyolo_path), PARAMS)
    assert classes_by_truth(truth, instances, table) == {1: "other", 2: "other", 3: "stromal"}


def test_overlaps_go_to_the_larger_label_then_the_higher_score():
    # hand-worked: four full 28 x 28 masks in overlapping boxes on a 10 x 30 image
    boxes = np.float32([[0, 0, 9, 9], [5, 0, 14, 9], [10, 0, 19, 9], [15, 0, 24, 9]])
    scores, labels = np.float32([0.9, 0.2, 0.5, 0.6]), np.int64([-100, 7, 3, 3])
    detections = Detections(boxes, scores, labels, np.ones((4, 28, 28), np.float32))
    instances = paste_instances(detections, (10, 30))
    # columns 5-9: label 7 beats -100; 10-14: 7 beats 3; 15-19: the higher score among label 3
    assert instances[0].tolist() == [1] * 5 + [2] * 10 + [4] * 10 + [0] * 5


def test_patch_at_half_mpp_gives_instances_on_its_grid(hdyolo_path):
    nuclei = [(30, 30, 6, 1), (64, 64, 6, 3), (96, 30, 6, 2)]  # 113 px discs at 0.5 mpp
    rgb, truth = draw((128, 128), nuclei)
    # only the settings nuclei_masks' params hold for a model (a KeyError if it read another)
    params = detector_settings(PARAMS | {"model": str(hdyolo_path)})
    instances, table = segment_patch(rgb, 0.5, (128, 128), params, load_detector(hdyolo_path))
    assert instances.shape == (128, 128)
    assert classes_by_truth(truth, instances, table) == {1: "tumor", 2: "immune", 3: "stromal"}
    # the model saw the discs at 0.25 mpp: about 4 x 113 px (scores 0.45; 0.11 at 0.5 mpp, below conf_thres 0.15)
    assert table["score"].between(0.40, 0.50).all()


def test_nms_params_reach_the_model(hdyolo_path):
    nuclei = [(40, 40, 8, 1), (40, 110, 10, 1), (110, 40, 12, 1), (110, 110, 14, 1)]  # areas ~200, 317, 441, 613
    rgb, truth = draw((160, 160), nuclei)
    areas = np.bincount(truth.ravel())[1:]
    model = load_detector(hdyolo_path, nms_params={"conf_thres": 0.3, "max_det": 2})
    assert model.module.headers.det.nms_params == {"conf_thres": 0.3, "iou_thres": 0.45, "max_det": 2.0}
    instances, table = detect_with_model(rgb, model, section_defaults("nuclei", {"tile": 256, "pad": 64}))
    # one tile: conf_thres drops the smallest, max_det keeps the two highest scores (largest discs)
    assert np.allclose(np.sort(table["score"]), np.sort(areas)[-2:] / 1000, atol=1e-3)
    assert set(np.unique(truth[instances > 0])) == {3, 4}
    with pytest.raises(NucleiError, match=r"nms_params \['classes'\] are not settings of this HD-Yolo file"):
        load_detector(hdyolo_path, nms_params={"classes": 1})
    with pytest.raises(NucleiError, match="nms_params must be numbers"):
        load_detector(hdyolo_path, nms_params={"max_det": "many"})


class DarkIsOneNucleus(torch.nn.Module):
    """histosynth's own contract: dark pixels are instance 1, of class 'lymph'."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        return (x[0].mean(0) < 0.5).long(), ["lymph"], torch.ones(1)


class Segmenter(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def test_own_contract_still_loads_and_other_modules_are_named(tmp_path):
    for module, name in ((DarkIsOneNucleus(), "own.pt"), (Segmenter(), "other.pt")):
        with pytest.warns(FutureWarning):
            torch.jit.script(module).save(str(tmp_path / name))
    model = load_detector(tmp_path / "own.pt")
    assert model.kind == "contract"
    rgb, truth = draw((64, 64), [(32, 32, 10, 1)])
    instances, table = detect_with_model(
        rgb, model, section_defaults("nuclei", {"model_classes": {"lymph": "immune"}, "tile": 64, "pad": 0})
    )
    assert classes_by_truth(truth, instances, table) == {1: "immune"}
    with pytest.raises(NucleiError, match="nms_params apply to HD-Yolo files only"):
        load_detector(tmp_path / "own.pt", nms_params={"max_det": 5})
    with pytest.raises(
        NucleiError, match=r"other.pt: a TorchScript module but neither an HD-Yolo file .* nor histosynth's"
    ):
        load_detector(tmp_path / "other.pt")
