"""The shared training loop: EMA maths, data checks, resume to the same trajectory, config
mismatch, NaN guard. Runs a tiny SPADE diffusion model (16 px, a few steps) on CPU."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from histosynth.generators.train_diffusion import train_diffusion
from histosynth.training.batches import epoch_order
from histosynth.training.checkpoints import checkpoints
from histosynth.training.ema import EMA
from histosynth.training.errors import ConfigMismatchError, DatasetError, NonFiniteLossError, TrainingError
from histosynth.training.resume import config_differences

from helpers import Shapes, assert_identical, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Crashing(Shapes):
    """Shapes that raises after `limit` item reads: a job killed mid-run."""

    def __init__(self, limit: int, **kw):
        super().__init__(**kw)
        self.limit, self.reads = limit, 0

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.limit:
            raise KeyboardInterrupt("killed")
        return super().__getitem__(i)


def weights(folder: Path) -> dict:
    return load_file(next(Path(folder).glob("*.safetensors")))


# ----------------------------------------------------------------------------- EMA


def test_ema_update_is_exactly_the_moving_average():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, decay=0.9, warmup=False)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for e, old, p in zip(ema.model.parameters(), before, model.parameters()):
        assert torch.equal(e, 0.9 * old + (1 - 0.9) * p)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_warmup_decay():
    ema = EMA(torch.nn.Linear(2, 2), decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(1 / 10)
    ema.updates = 10_000
    assert ema.current_decay() == 0.999


# ----------------------------------------------------------------------------- helpers


def test_epoch_order_is_a_function_of_seed_and_epoch_and_shards_cover_everything():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    shards = [epoch_order(10, 1, 3, rank, 4) for rank in range(4)]
    assert {len(s) for s in shards} == {3} and set(sum(shards, [])) == set(range(10))


def test_class_balance_draws_the_rare_label_as_often_as_the_common_one():
    from histosynth.training.batches import balance_weights

    labels = [0] * 90 + [1] * 10
    draws = []
    for epoch in range(20):
        draws += epoch_order(100, 3, epoch, weights=balance_weights(labels, 1.0))
    share = sum(labels[i] for i in draws) / len(draws)
    assert 0.45 < share < 0.55  # 10 % of the items, half of the draws
    half = (
        sum(labels[i] for e in range(20) for i in epoch_order(100, 3, e, weights=balance_weights(labels, 0.5))) / 2000
    )
    assert 0.2 < half < 0.3  # 10 / (10 + 90 / 3) = 0.25
    assert epoch_order(100, 3, 0, weights=balance_weights(labels, 1.0)) == epoch_order(
        100, 3, 0, weights=balance_weights(labels, 1.0)
    )
    assert torch.equal(balance_weights(labels, 0.0), torch.ones(100, dtype=torch.float64))


def test_class_balance_needs_labels(tmp_path):
    class Unlabelled(Shapes):
        labels = None

    with pytest.raises(TrainingError, match="class_balance"):
        train_diffusion(Unlabelled(n=4), tmp_path, tiny(class_balance=1.0))


def test_config_differences_ignore_run_length():
    saved = {"lr": 1, "train": {"steps": 10, "lr": 1e-3, "betas": (0.9, 0.99)}}
    assert config_differences(saved, {"lr": 1, "train": {"steps": 99, "lr": 1e-3, "betas": [0.9, 0.99]}}) == []
    assert config_differences(saved, {"lr": 2, "train": {"steps": 10, "lr": 1e-3}}) == ["lr", "train.betas"]


# ----------------------------------------------------------------------------- data errors


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        train_diffusion(Shapes(n=0), tmp_path, tiny())


def test_mixed_sizes_in_a_batch_are_refused_naming_both(tmp_path):
    with pytest.raises(DatasetError, match=r"3x16x16 and 3x32x32|3x32x32 and 3x16x16"):
        train_diffusion(Shapes(n=4, sizes={2: 32}), tmp_path, tiny(batch_size=4))


def test_mixed_sizes_across_batches_are_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"3x\d+x\d+ and 3x\d+x\d+"):
        train_diffusion(Shapes(n=2, sizes={1: 32}), tmp_path, tiny(batch_size=1))


# ----------------------------------------------------------------------------- resume


def test_kill_and_resume_gives_bit_identical_weights(tmp_path):
    """6 steps straight vs. killed during step 5 (checkpoints at 2 and 4, mid-epoch: 10 items in
    batches of 4) then resumed with a fresh model and optimiser: same weights and EMA, bit for bit."""
    straight = train_diffusion(Shapes(), tmp_path / "a", tiny(), seed=3)

    reads_before_training = 1 + 2  # check_dataset + the preview batch
    reads_for_4_steps = 4 + 4 + 2 + 4  # epoch 0: 4, 4, 2; epoch 1: 4
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(Crashing(reads_before_training + reads_for_4_steps + 2), tmp_path / "b", tiny(), seed=3)
    assert [p.name for p in checkpoints(tmp_path / "b" / "checkpoints")] == ["step-2", "step-4"]
    assert not (tmp_path / "b" / "model").exists()
    resumed = train_diffusion(Shapes(), tmp_path / "b", tiny(), seed=3)

    assert straight["steps"] == resumed["steps"] == 6
    assert_identical(weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model"))  # EMA weights
    assert_identical(weights(tmp_path / "a/checkpoints/step-6/model"), weights(tmp_path / "b/checkpoints/step-6/model"))
    with open(tmp_path / "a" / "loss.csv") as fa, open(tmp_path / "b" / "loss.csv") as fb:
        a, b = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert set(a[0]) >= {"step", "epoch", "loss", "lr", "seconds", "samples_per_s"}


def test_resume_with_a_changed_config_is_refused_naming_the_key(tmp_path):
    train_diffusion(Shapes(n=4), tmp_path, tiny(steps=2, checkpoint_every=2), seed=3)
    with pytest.raises(ConfigMismatchError, match=r"train\.lr") as err:
        train_diffusion(Shapes(n=4), tmp_path, tiny(steps=4, lr=5e-4), seed=3)
    assert "train.steps" not in str(err.value).split("differing keys:")[1].split("(")[0]
    with pytest.raises(ConfigMismatchError, match="cond_dropout"):
        train_diffusion(Shapes(n=4), tmp_path, {**tiny(steps=4), "cond_dropout": 0.5}, seed=3)
    # run length alone may change: this resumes
    assert train_diffusion(Shapes(n=4), tmp_path, tiny(steps=3, checkpoint_every=1), seed=3)["steps"] == 3


def test_non_finite_loss_stops_naming_the_step_and_saves_no_model(tmp_path):
    data = Shapes(n=8, nan_at=5)
    bad_step = next(i // 2 + 1 for i, item in enumerate(epoch_order(8, 3, 0)) if item == 5)
    assert bad_step == 4  # seed 3's order: steps 1-3 are good, so there are checkpoints to check
    with pytest.raises(NonFiniteLossError, match=rf"at step {bad_step}\b") as err:
        train_diffusion(data, tmp_path, tiny(batch_size=2, steps=8, checkpoint_every=1), seed=3)
    assert f"step-{bad_step - 1}" in str(err.value)  # the last good checkpoint is named
    assert not (tmp_path / "model").exists()
    saved = checkpoints(tmp_path / "checkpoints")
    assert [int(p.name[5:]) for p in saved] == [bad_step - 2, bad_step - 1]  # keep_checkpoints=2, none at or after it
    for path in saved:
        assert all(torch.isfinite(t).all() for t in weights(path / "model").values())


def test_checkpoint_is_self_describing(tmp_path):
    train_diffusion(Shapes(n=4), tmp_path, tiny(steps=2), seed=1)
    ckpt = tmp_path / "checkpoints" / "step-2"
    assert {p.name for p in ckpt.iterdir()} >= {"model", "ema", "trainer.pt", "config.json", "loss.csv"}
    config = json.loads((ckpt / "config.json").read_text())
    assert config["seed"] == 1 and config["train"]["lr"] == 1e-3 and config["data"]["items"] == 4
    assert re.search("SpadeUNet", (ckpt / "model" / "config.json").read_text())
