"""The class-conditional GAN of seeds 000/001 (histosynth.generators.gan): shapes per size, spectral
norm, class conditioning, hinge losses, augmentation, the discriminator learning, save/load, and
training through the shared loop with bit-identical resume. Tiny widths, CPU, seconds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.nn.utils import parametrize

from histosynth.config import section_defaults
from histosynth.files import MODEL_INFO
from histosynth.generators.gan import (
    diff_augment,
    diffaugment_policy,
    generate,
    hinge_d_loss,
    hinge_g_loss,
    load_gan,
    main,
    noise,
    train,
)
from histosynth.generators.gan_networks import GAN, Generator, build_gan, discriminator_widths, generator_widths
from histosynth.generators.monitor import FeatureSpace, FidelityMonitor, feature_spaces
from histosynth.training.batches import random_dihedral
from histosynth.training.checkpoints import checkpoints
from histosynth.training.errors import TrainingError

from helpers import Toy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"ch_max": 32, "width": 8}


def tiny(**train_settings) -> dict:
    return {
        **TINY,
        "size": 16,
        "attention_g": [8],
        "attention_d": [16],
        "train": {
            "steps": 4,
            "batch_size": 4,
            "checkpoint_every": 2,
            "keep_checkpoints": 2,
            "log_every": 1,
            "sample_every": 2,
            "sample_count": 3,
            "ema_decay": 0.9,
            "diffaugment": True,
            **train_settings,
        },
    }


def colour_space() -> FeatureSpace:
    """A feature space any test affords: each image's per-channel mean and standard deviation."""

    def embed(images: torch.Tensor) -> np.ndarray:
        x = images.double() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).numpy()

    return FeatureSpace("colour moments", "fd", "kd", embed)


def loss_rows(folder: Path) -> list[dict]:
    with open(folder / "loss.csv") as f:
        return list(csv.DictReader(f))


def weights(folder: Path) -> dict:
    return load_file(next(Path(folder).glob("*.safetensors")))


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys() and len(a) > 50
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


# ----------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_stages_and_attention_per_size(size):
    torch.manual_seed(0)
    model = GAN(num_classes=3, size=size, z_dim=16, **TINY).eval()
    g, d = model.generator, model.discriminator
    z, y = torch.randn(2, 16), torch.tensor([0, 2])
    images = g(z, y)
    assert images.shape == (2, 3, size, size) and images.abs().max() <= 1
    assert d(images, y).shape == (2,)
    stages = int(np.log2(size // 4))
    assert len(g.ups) == len(d.downs) == stages  # log2(size / 4) up- and downsamplings
    assert g.resolutions == [4 * 2**i for i in range(stages)]  # cells at 4 .. size/2
    assert d.resolutions == [size // 2**i for i in range(stages)]  # cells at size .. 8
    assert set(g.attention) == {str(r) for r in (16, 32) if r < size}  # seed: 16 and 32, toward the output
    assert set(d.attention) == {str(r) for r in (32, 64) if r <= size}  # seed: 64 and 32, near the input


def test_widths_follow_the_seed_tables_at_64_px():
    # Table 1: 4x4 and 8x8 1024, 16: 512, 32: 256, 64: 128; Table 3: 64 at 64x64 up to 1024 at 4x4
    assert generator_widths(64, 1024, 64) == {4: 1024, 8: 1024, 16: 512, 32: 256, 64: 128}
    assert discriminator_widths(64, 1024, 64) == {4: 1024, 8: 512, 16: 256, 32: 128, 64: 64}
    assert generator_widths(32, 128, 16) == {4: 128, 8: 128, 16: 64, 32: 32}
    assert discriminator_widths(256, 1024, 64)[256] == 64  # the floor
    with pytest.raises(TrainingError, match="gan.size"):
        generator_widths(48, 1024, 64)


def test_spectral_norm_on_every_conv_and_linear():
    model = GAN(num_classes=2, size=32, z_dim=8, **TINY)
    layers = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear, torch.nn.Embedding)
    for net in (model.discriminator, model.generator):
        found = [(name, m) for name, m in net.named_modules() if isinstance(m, layers)]
        if net is model.generator:  # the conditional BatchNorm's gains and biases are not layers the seed normalises
            found = [(name, m) for name, m in found if not isinstance(m, torch.nn.Embedding)]
        assert len(found) > 20
        plain = [name for name, m in found if not parametrize.is_parametrized(m, "weight")]
        assert not plain, f"layers without spectral norm: {plain}"
        assert all(type(m.parametrizations.weight[0]).__name__ == "_SpectralNorm" for _, m in found)
    # the power iteration (one per forward in training) converges: whatever the raw weight's
    # scale, the weight the layer uses has largest singular value 1
    conv = model.discriminator.cells[0].conv1
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(5)
        for _ in range(100):
            _ = conv.weight  # each access in training mode is one power iteration
    assert torch.linalg.matrix_norm(conv.parametrizations.weight.original.detach().flatten(1), ord=2) > 2
    assert torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item() == pytest.approx(1.0, abs=1e-3)


def test_the_class_label_changes_the_image_and_nothing_else_does():
    torch.manual_seed(1)
    g = Generator(num_classes=3, size=32, z_dim=16, **TINY)
    with torch.no_grad():  # the class gains start at 1 and biases at 0: make them differ, as training does
        for up in g.ups:
            up.norm.gain.weight.add_(0.2 * torch.randn_like(up.norm.gain.weight))
    g.eval()
    z = torch.randn(1, 16).expand(3, 16)
    images = g(z, torch.tensor([0, 1, 0]))
    assert torch.equal(images[0], images[2])
    assert (images[0] - images[1]).abs().max() > 1e-3


def test_hinge_losses_on_hand_values():
    d_real, d_fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - [2, 0.5, -1]) = [0, 0.5, 2] -> 5/6; relu(1 + [-2, 0, 1]) = [0, 1, 2] -> 1
    assert hinge_d_loss(d_real, d_fake).item() == pytest.approx(5 / 6 + 1)
    assert hinge_g_loss(d_fake).item() == pytest.approx(1 / 3)
    assert hinge_d_loss(torch.tensor([1.5]), torch.tensor([-3.0])).item() == 0  # both beyond the margin


def test_discriminator_learns_to_separate_reals_from_the_initial_fakes():
    torch.manual_seed(0)
    model = GAN(num_classes=2, size=16, z_dim=8, **TINY, attention_g=(8,), attention_d=(16,)).train()
    data = Toy(n=8)
    real = torch.nn.functional.interpolate(torch.stack([data[i]["image"] for i in range(8)]), size=16, mode="area")
    y = torch.as_tensor(data.labels)
    optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=4e-4, betas=(0.5, 0.999))
    z = torch.randn(8, 8)
    losses = []
    for _ in range(25):
        d_real, d_fake = model(z, y, real=real)
        loss = hinge_d_loss(d_real, d_fake)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in model.generator.parameters())  # the D step does not reach G
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        d_real, d_fake = model(z, y, real=real)
    assert d_real.min() > d_fake.max()


# ----------------------------------------------------------------------------- augmentation and noise


def test_dihedral_gives_one_of_the_eight_symmetries_of_each_image():
    torch.manual_seed(0)
    images = torch.randn(64, 3, 5, 5)
    out = random_dihedral(images)
    found = set()
    for x, o in zip(images, out):
        symmetries = [torch.rot90(v, k, (-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]
        matches = [i for i, s in enumerate(symmetries) if torch.equal(s, o)]
        assert matches
        found.add(matches[0])
    assert found == set(range(8))


def test_diffaugment_is_differentiable_and_keeps_shapes():
    assert diffaugment_policy(True) == ("colour", "translation", "cutout")
    assert diffaugment_policy(False) == diffaugment_policy([]) == ()
    assert diffaugment_policy(["cutout", "colour"]) == ("colour", "cutout")
    with pytest.raises(TrainingError, match="flip"):
        diffaugment_policy(["flip"])
    torch.manual_seed(0)
    x = torch.full((4, 3, 16, 16), 0.5, requires_grad=True)
    out = diff_augment(x, ("translation",))
    assert out.shape == x.shape
    assert set(out.detach().unique().tolist()) <= {0.0, 0.5}  # shifted pixels or the zero fill
    cut = diff_augment(x, ("cutout",))
    zeroed = (cut == 0).float().mean(dim=(1, 2, 3))
    assert bool(((zeroed > 0) & (zeroed <= 0.25)).all())  # at most a half-size square
    diff_augment(x, ("colour", "translation", "cutout")).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_noise_is_a_function_of_the_seed_and_truncation_bounds_it():
    assert torch.equal(noise(128, 7), noise(128, 7)) and not torch.equal(noise(128, 7), noise(128, 8))
    z = noise(4096, 3, truncation=0.5)
    assert z.abs().max() <= 0.5 and z.std() > 0.2
    with pytest.raises(TrainingError, match="truncation"):
        noise(8, 1, truncation=0)


# ----------------------------------------------------------------------------- save, load, generate


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_gan({**TINY, "size": 32, "z_dim": 16}, num_classes=2, labels=["benign", "malignant"]).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / MODEL_INFO).write_text("{}")
    loaded = load_gan(tmp_path)
    assert loaded.config.labels == ["benign", "malignant"] and loaded.config.size == 32
    seeds, y = [1, 2, 3], torch.tensor([0, 1, 1])
    assert np.array_equal(generate(model, y, seeds), generate(loaded, y, seeds))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(model.discriminator(images, y), loaded.discriminator(images, y))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_generate_one_image_per_seed_independent_of_the_batch():
    torch.manual_seed(0)
    model = GAN(num_classes=2, size=16, z_dim=8, **TINY)
    out = generate(model, torch.tensor([0, 1, 1]), [5, 6, 7])
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8
    alone = generate(model, torch.tensor([1]), [6])
    assert np.abs(out[1].astype(int) - alone[0].astype(int)).max() <= 1  # float rounding across batch sizes at most
    assert not np.array_equal(out[1], out[2])
    assert model.generator.training  # left as found
    with pytest.raises(TrainingError, match="2 labels for 3 seeds"):
        generate(model, torch.tensor([0, 1]), [1, 2, 3])


def test_load_gan_refuses_a_folder_without_a_gan(tmp_path):
    with pytest.raises(TrainingError, match="not a histosynth GAN"):
        load_gan(tmp_path)


# ----------------------------------------------------------------------------- training


def test_training_writes_model_losses_and_class_rows_of_previews(tmp_path):
    data = [Toy()[i] for i in range(6)]  # a plain list of dicts; no per-item labels, so no class balance
    summary = train(data, tmp_path, tiny(class_balance=0.0), seed=1, labels=["red", "blue"])
    assert summary["steps"] == 4
    meta = json.loads((tmp_path / "model" / MODEL_INFO).read_text())
    assert (
        meta["num_classes"] == 2 and meta["size"] == 16 and meta["z_dim"] == 128 and meta["labels"] == ["red", "blue"]
    )
    assert meta["training"]["train"]["lr_d"] == 4e-4 and meta["generator_weights"] == "ema"
    with open(tmp_path / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert all(r["d_loss"] and r["g_loss"] and r["d_real"] and r["d_fake"] for r in rows)
    assert all(r["loss"] == r["d_loss"] and float(r["lr"]) == 4e-4 for r in rows)
    assert {p.name for p in (tmp_path / "samples").iterdir()} == {"step-2.png", "step-4.png"}
    grid = Image.open(tmp_path / "samples" / "step-4.png")
    assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # sample_count columns, one row per class, 2 px gaps
    trained = load_gan(tmp_path / "model")
    assert trained.config.labels == ["red", "blue"]
    assert generate(trained, torch.tensor([0, 1]), [1, 2]).shape == (2, 16, 16, 3)
    # the saved discriminator is the trained one, the generator the EMA
    raw = weights(tmp_path / "checkpoints" / "step-4" / "model")
    ema = weights(tmp_path / "checkpoints" / "step-4" / "ema")
    saved = weights(tmp_path / "model")
    d_keys = [k for k in saved if k.startswith("discriminator.")]
    g_keys = [k for k in saved if k.startswith("generator.") and "original" in k]
    assert d_keys and g_keys
    assert all(torch.equal(saved[k], raw[k]) for k in d_keys)
    assert all(torch.equal(saved[k], ema[k]) for k in g_keys)
    assert any(not torch.equal(saved[k], raw[k]) for k in g_keys)


def test_resume_is_bit_identical_and_keeps_both_optimisers(tmp_path):
    """4 steps straight vs. 2 steps, then a fresh run with steps: 4 resuming from step-2: the
    same generator, discriminator, EMA, both Adam states, losses and fidelity values, bit for bit
    (the fidelity evaluation at every step draws from no global generator)."""
    monitored = {"feature_spaces": [colour_space()], "seed": 3}
    straight = train(Toy(), tmp_path / "a", tiny(steps=4, eval_every=1, eval_images=4), **monitored)
    train(Toy(), tmp_path / "b", tiny(steps=2, eval_every=1, eval_images=4), **monitored)
    assert [p.name for p in checkpoints(tmp_path / "b" / "checkpoints")] == ["step-2"]
    resumed = train(Toy(), tmp_path / "b", tiny(steps=4, eval_every=1, eval_images=4), **monitored)
    assert straight["steps"] == resumed["steps"] == 4
    assert_identical(weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model"))
    for part in ("model", "ema"):
        assert_identical(
            weights(tmp_path / f"a/checkpoints/step-4/{part}"), weights(tmp_path / f"b/checkpoints/step-4/{part}")
        )
    states = [torch.load(tmp_path / f"{run}/checkpoints/step-4/trainer.pt", weights_only=False) for run in "ab"]
    assert set(states[0]["optimizers"]) == {"d", "g"} and set(states[0]["lr_schedules"]) == {"d", "g"}
    for name in ("d", "g"):
        a, b = (s["optimizers"][name]["state"] for s in states)
        assert a.keys() == b.keys() and len(a) > 10
        assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    with open(tmp_path / "a" / "loss.csv") as fa, open(tmp_path / "b" / "loss.csv") as fb:
        a, b = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert [r["step"] for r in b] == ["1", "2", "3", "4"]
    assert [(r["d_loss"], r["g_loss"], r["d_real"], r["fd"], r["kd"]) for r in a] == [
        (r["d_loss"], r["g_loss"], r["d_real"], r["fd"], r["kd"]) for r in b
    ]
    assert all(float(r["fd"]) > 0 for r in a)


def test_fidelity_monitor_is_zero_for_the_real_images_and_grows_with_a_colour_shift():
    toy = Toy(n=16)
    real = torch.stack([((toy[i]["image"] + 1) * 127.5).round().to(torch.uint8) for i in range(len(toy))])
    monitor = FidelityMonitor(real, [colour_space()], batch_size=5, kid_subsets=4, kid_subset_size=8, seed=0)
    same = monitor(real)
    assert set(same) == {"fd", "kd"} and abs(same["fd"]) < 1e-9
    darker, darkest = monitor((real // 4 * 3).to(torch.uint8)), monitor((real // 2).to(torch.uint8))
    assert 0.001 < darker["fd"] < darkest["fd"] and same["kd"] < darker["kd"] < darkest["kd"]


def test_fidelity_during_training_joins_the_loss_rows_of_its_steps(tmp_path):
    """eval_every 2 of 4 steps with rows every 3: rows at 2 (evaluation), 3 (log) and 4 (both);
    FD/KD of the EMA generator's images at 2 and 4 only; no space, no columns filled."""
    train(
        Toy(n=8),
        tmp_path / "on",
        tiny(steps=4, log_every=3, eval_every=2, eval_images=6, sample_every=0),
        seed=0,
        feature_spaces=[colour_space()],
    )
    rows = loss_rows(tmp_path / "on")
    assert [r["step"] for r in rows] == ["2", "3", "4"]
    assert [bool(r["fd"]) for r in rows] == [True, False, True] and [bool(r["kd"]) for r in rows] == [True, False, True]
    assert float(rows[0]["fd"]) > 0 and not rows[0]["fid"]
    train(Toy(n=8), tmp_path / "off", tiny(steps=2, eval_every=1, sample_every=0), seed=0)
    assert not any(r["fd"] for r in loss_rows(tmp_path / "off"))


def test_feature_spaces_say_what_is_missing_and_build_what_is_not(tmp_path, caplog):
    """The segmenter's space (quality.extractor 'segmentation', the default) is left to the quality
    stage and Inception is absent without its weights: no space, and a log line naming each; a timm
    extractor with a local weights file gives fd/kd, with no model trained downstream."""
    import timm

    quality = section_defaults("quality")
    with caplog.at_level("INFO", logger="histosynth.generators.monitor"):
        assert feature_spaces(quality, tmp_path / "weights") == []
    assert "no fd/kd" in caplog.text and "rule image_quality" in caplog.text
    assert "no fid/kid" in caplog.text and "fetch_weights" in caplog.text
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), tmp_path / "timm.pth")
    timm_quality = {**quality, "extractor": "test_efficientnet", "extractor_weights": str(tmp_path / "timm.pth")}
    [space] = feature_spaces(timm_quality, tmp_path / "weights")
    assert (space.distance, space.kernel) == ("fd", "kd") and "test_efficientnet" in space.name
    assert space.embed(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape[0] == 2


def test_n_critic_updates_the_generator_every_n_steps(tmp_path):
    train(Toy(), tmp_path, tiny(steps=4, n_critic=2, sample_every=0, diffaugment=False), seed=0)
    with open(tmp_path / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [bool(r["g_loss"]) for r in rows] == [False, True, False, True]
    assert all(r["d_loss"] for r in rows)


def test_num_classes_must_match_the_labels(tmp_path):
    with pytest.raises(TrainingError, match="num_classes"):
        train(Toy(), tmp_path, {**tiny(), "num_classes": 3}, labels=["red", "blue"])


def test_defaults_are_the_cpu_demo_with_the_seed_optimiser():
    c = section_defaults("gan")
    assert (c["size"], c["z_dim"], c["width"], c["num_classes"]) == (32, 128, 16, 0)
    t = c["train"]
    assert (t["lr_g"], t["lr_d"], t["betas"], t["n_critic"]) == (1e-4, 4e-4, [0.5, 0.999], 1)


def test_command_line_entry_point_names_the_classes_of_a_resolved_config(tmp_path):
    config = tmp_path / "config.json"
    labels = {
        "source": "region",
        "classes": ["background", "tumour"],
        "regions": ["tumour"],
        "background": "background",
    }
    config.write_text(json.dumps({"seed": 2, "labels": labels, "gan": tiny(steps=2, sample_every=0)}))
    args = [
        "train",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "out"),
        "--dataset",
        "helpers:toy_factory",
        "--index",
        "unused.parquet",
        "--checkpoints",
        str(tmp_path / "ckpt"),
    ]
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "model" / MODEL_INFO).read_text())["labels"] == ["background", "tumour"]
    assert (tmp_path / "ckpt" / "step-2" / "trainer.pt").is_file()


def test_gan_set_per_label_at_the_patch_size_feeds_mixing_but_not_segmentation(tmp_path):
    import pandas as pd
    from PIL import Image

    from histosynth.data.io import write_relative
    from histosynth.evaluation.mixing import mix_dataset, read_mix, without_masks
    from histosynth.evaluation.segmentation import SegmentationError, train_segmentation
    from histosynth.generators.label_sets import gan_stage
    from histosynth.generators.set_files import SynthesisError

    labels = {"source": "sheet", "classes": ["benign", "malignant"], "regions": ["Tumour"], "background": "background"}
    torch.manual_seed(0)
    model = build_gan({**TINY, "size": 16, "z_dim": 16, "attention_g": [8], "attention_d": [16]}, 2, labels["classes"])
    model.save_pretrained(tmp_path / "gan")
    (tmp_path / "gan" / MODEL_INFO).write_text("{}")
    patches = tmp_path / "patches"
    (patches / "p").mkdir(parents=True)
    rows = []
    for i, label in enumerate(["benign", "malignant", "benign"]):
        Image.fromarray(np.full((24, 24, 3), 60 * i, np.uint8)).save(patches / "p" / f"i{i}.png")
        Image.fromarray(np.zeros((24, 24), np.uint8)).save(patches / "p" / f"m{i}.png")
        rows.append(
            {
                "patch_id": f"p{i}",
                "slide": f"s{i}",
                "image": str(patches / "p" / f"i{i}.png"),
                "mask": str(patches / "p" / f"m{i}.png"),
                "frac_tumour": 0.0,
                "label": label,
                "split": "train",
            }
        )
    write_relative(pd.DataFrame(rows), patches / "s.parquet", ("image", "mask"))
    settings = {"batch_size": 2, "grid_per_class": 2, "gan": {"per_class": {"malignant": 3, "benign": 2}}}
    manifest = gan_stage(
        tmp_path / "gan",
        [patches / "s.parquet"],
        tmp_path / "set",
        settings=settings,
        labels=labels,
        size=24,
        seed=3,
        device="cpu",
    )
    assert list(manifest["class"]) == ["benign"] * 2 + ["malignant"] * 3 and list(manifest["label"]) == [0, 0, 1, 1, 1]
    assert "mask" not in manifest and (manifest["mode"] == "gan").all() and manifest["seed"].is_unique
    assert all(np.asarray(Image.open(tmp_path / "set" / p)).shape == (24, 24, 3) for p in manifest["image"])  # resized
    assert sorted(p.name for p in (tmp_path / "set").glob("grid_*.png")) == ["grid_benign.png", "grid_malignant.png"]
    again = gan_stage(
        tmp_path / "gan",
        [patches / "s.parquet"],
        tmp_path / "again",
        settings=settings,
        labels=labels,
        size=24,
        seed=3,
        device="cpu",
    )
    for a, b in zip(manifest["image"], again["image"]):  # deterministic given the seed
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "set" / a)), np.asarray(Image.open(tmp_path / "again" / b))
        )
    with pytest.raises(SynthesisError, match="trained on the labels"):
        gan_stage(
            tmp_path / "gan",
            [patches / "s.parquet"],
            tmp_path / "other",
            settings=settings,
            size=24,
            seed=3,
            labels={**labels, "classes": ["1", "2"]},
            device="cpu",
        )

    curated = manifest.assign(image=[str(tmp_path / "set" / p) for p in manifest["image"]], keep=True, reason="")
    write_relative(curated, tmp_path / "curated" / "gan.parquet", ("image",))
    mix_dataset(
        [patches / "s.parquet"],
        {"gan": tmp_path / "curated" / "gan.parquet"},
        {"name": "gan4", "synthetic": 4},
        0,
        ["Tumour"],
        labels,
        tmp_path / "mix.parquet",
        tmp_path / "share.parquet",
        on_shortfall="error",
    )
    mixed = read_mix(tmp_path / "mix.parquet")
    assert without_masks(mixed) == 4 and set(mixed.loc[mixed["mask"].isna(), "mode"]) == {"gan"}
    assert pd.read_parquet(tmp_path / "share.parquet")["n_synthetic"].iloc[0] == 4
    with pytest.raises(SegmentationError, match="4 synthetic images have no label mask"):
        train_segmentation(
            tmp_path / "mix.parquet",
            [patches / "s.parquet"],
            tmp_path / "seg",
            seed=0,
            config={"classes": ["Tumour"], "segmentation": {}, "weights_dir": str(tmp_path)},
        )
