"""The ground modules shared by every layer: one dihedral transform (torch and numpy alike), the
copy detector's eight views built on it, the training loop's weights hook, and the sha256 helpers."""

import numpy as np
import pytest
import torch
from torch import nn

from histosynth.evaluation.copies import eight_views
from histosynth.files import content_hash, file_hash, folder_hash
from histosynth.nets import dihedral, random_ops
from histosynth.training.checkpoints import load_weights, save_weights


def symmetries(x: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of a square (H, W) array, each by its op: op & 4 mirrors, op & 3 quarter-turns."""
    return [np.rot90(x[:, ::-1] if op & 4 else x, op & 3) for op in range(8)]


def test_dihedral_applies_each_items_op_in_torch_and_numpy_alike():
    images = np.arange(8 * 2 * 5 * 5, dtype=np.float32).reshape(8, 2, 5, 5)
    ops = [3, 0, 7, 4, 1, 6, 2, 5]
    turned_np = dihedral(images, ops)
    turned_torch = dihedral(torch.from_numpy(images), torch.tensor(ops)).numpy()
    assert np.array_equal(turned_np, turned_torch)
    for image, op, turned in zip(images, ops, turned_np):
        for channel in range(2):
            assert np.array_equal(turned[channel], symmetries(image[channel])[op])


def test_dihedral_on_channels_last_arrays_and_random_ops_cover_all_eight():
    image = np.arange(4 * 4 * 3).reshape(1, 4, 4, 3)
    assert np.array_equal(dihedral(image, [1], axes=(1, 2))[0, :, :, 2], symmetries(image[0, :, :, 2])[1])
    ops = random_ops(400, torch.Generator().manual_seed(0))
    assert set(ops.tolist()) == set(range(8))


def test_eight_views_keep_the_order_curated_tables_record():
    """View 2k is k quarter turns, view 2k + 1 that turn mirrored left-right (nearest_view indexes them)."""
    images = np.random.default_rng(0).integers(0, 255, (2, 6, 6, 3), dtype=np.uint8)
    views = eight_views(images)
    assert views.shape == (8, 2, 6, 6, 3)
    for k in range(4):
        turned = np.rot90(images, k, axes=(1, 2))
        assert np.array_equal(views[2 * k], turned) and np.array_equal(views[2 * k + 1], turned[:, :, ::-1])


def test_weights_hook_saves_a_plain_module_as_its_state_dict(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    save_weights(net, tmp_path / "plain")
    assert [p.name for p in (tmp_path / "plain").iterdir()] == ["model.safetensors"]
    copy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    load_weights(copy, tmp_path / "plain")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), copy.state_dict().values()))


def test_weights_hook_uses_save_pretrained_where_a_model_has_it(tmp_path):
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config

    class Tiny(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width: int = 3):
            super().__init__()
            self.linear = nn.Linear(width, 1)

    save_weights(Tiny(5), tmp_path / "pretrained")
    assert (tmp_path / "pretrained" / "config.json").is_file()
    assert Tiny.from_pretrained(tmp_path / "pretrained").config.width == 5


def test_hashes_follow_the_bytes_and_names_they_cover(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "weights.safetensors").write_bytes(b"abc")
    before = content_hash(model)
    (model / "notes.txt").write_text("not a model file")
    assert content_hash(model) == before  # only configs and weights count
    (model / "weights.safetensors").write_bytes(b"abd")
    assert content_hash(model) != before
    assert file_hash(model / "weights.safetensors") != file_hash(model / "config.json")
    flat = folder_hash(model, (".txt",))
    (model / "sub" / "more.txt").write_text("x")
    assert folder_hash(model, (".txt",)) == flat  # subfolders only with recursive
    assert folder_hash(model, (".txt",), recursive=True) != flat


def test_dihedral_refuses_an_op_list_of_another_length():
    with pytest.raises(ValueError):
        dihedral(np.zeros((2, 3, 3)), [0])
