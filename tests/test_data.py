import numpy as np
import pytest
import torch

from dynbatch.data import DeviceData, VariableBatchSampler, balanced_subset, hold_out, load_dataset
from dynbatch.errors import UserError


def test_digits_is_real_and_split_fixed():
    src = load_dataset("digits")
    assert src.x_train.shape == (1437, 8, 8, 1) and src.x_test.shape == (360, 8, 8, 1)
    assert src.x_train.dtype == np.uint8 and src.num_classes == 10
    assert np.array_equal(src.x_train, load_dataset("digits").x_train)
    assert sorted(np.unique(src.y_test)) == list(range(10))


def test_shipped_digits_are_scikit_learns_split():
    """The packaged digits.npz holds exactly what scikit-learn's copy and the documented split give."""
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.model_selection import train_test_split

    d = datasets.load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target.astype(np.int64), test_size=360, stratify=d.target,
                                              random_state=0)
    src = load_dataset("digits")
    for got, want in ((src.x_train, x_tr), (src.y_train, y_tr), (src.x_test, x_te), (src.y_test, y_te)):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_npz_roundtrip(tiny_npz):
    src = load_dataset(f"npz:{tiny_npz}")
    assert src.num_classes == 3 and src.image_shape == (3, 12, 12)
    with pytest.raises(UserError, match="labels go up to 2"):
        load_dataset(f"npz:{tiny_npz}", num_classes=2)


@pytest.mark.parametrize("bad, match", [
    (dict(x_train=np.zeros((4, 8, 8, 3), np.float32)), "expected uint8"),
    (dict(y_train=np.array([0, 1, 2])), "one per image"),
    (dict(y_train=np.array([0, -1, 2, 1])), "negative labels"),
])
def test_npz_validation(tmp_path, bad, match):
    arrays = dict(x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.array([0, 1, 2, 1]),
                  x_test=np.zeros((2, 8, 8, 3), np.uint8), y_test=np.array([0, 1]))
    arrays.update(bad)
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UserError, match=match):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


def test_balanced_subset():
    y = np.repeat(np.arange(10), 50)
    idx = balanced_subset(y, 100, seed=3)
    assert len(idx) == 100 and len(set(idx)) == 100
    assert np.bincount(y[idx], minlength=10).tolist() == [10] * 10
    assert np.array_equal(idx, balanced_subset(y, 100, seed=3))
    assert not np.array_equal(idx, balanced_subset(y, 100, seed=4))
    counts = np.bincount(y[balanced_subset(y, 15, seed=0)], minlength=10)
    assert counts.sum() == 15 and counts.max() - counts.min() <= 1
    # A class too small for its quota gives all it has; the rest comes from other classes.
    y2 = np.array([0] * 2 + [1] * 40)
    assert len(balanced_subset(y2, 20, seed=0)) == 20
    with pytest.raises(UserError):
        balanced_subset(y, 501, seed=0)


def test_device_pipeline_crop_and_flip_are_exact(tiny_npz):
    src = load_dataset(f"npz:{tiny_npz}")
    data = DeviceData(src, torch.device("cpu"))
    idx = torch.arange(16)
    plain, y = data.train.batch(idx)  # centre crop = the original image, normalised
    raw = torch.from_numpy(src.x_train[:16]).permute(0, 3, 1, 2).float()
    expect = (raw / 255 - torch.tensor(src.mean).view(1, 3, 1, 1)) / torch.tensor(src.std).view(1, 3, 1, 1)
    torch.testing.assert_close(plain, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, torch.from_numpy(src.y_train[:16]))
    g = torch.Generator().manual_seed(0)
    aug, _ = data.train.batch(idx, g)
    assert aug.shape == plain.shape
    # Every augmented image is a shifted (and possibly mirrored) window of the zero-padded original.
    pad = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    back = aug * torch.tensor(src.std).view(1, 3, 1, 1) + torch.tensor(src.mean).view(1, 3, 1, 1)
    back = back * 255
    for b in range(16):
        windows = [w for dy in range(9) for dx in range(9) for w in
                   (pad[b, :, dy:dy + 12, dx:dx + 12], pad[b, :, dy:dy + 12, dx:dx + 12].flip(-1))]
        assert min(float((w - back[b]).abs().max()) for w in windows) < 1e-3
    # Same generator state, same augmentation.
    again, _ = data.train.batch(idx, torch.Generator().manual_seed(0))
    assert torch.equal(aug, again)


def test_sampler_variable_sizes_and_state():
    s = VariableBatchSampler(10, seed=0)
    a = s.next(4)
    b = s.next(100)
    assert len(a) == 4 and len(b) == 6 and s.epoch_done
    assert sorted(torch.cat([a, b]).tolist()) == list(range(10))
    s.new_epoch()
    s.next(3)
    state = s.state_dict()
    follow = [s.next(2), s.next(5)]
    s.new_epoch()
    nxt = s.perm.clone()
    t = VariableBatchSampler(10, seed=99)
    t.load_state_dict(state)
    assert torch.equal(t.next(2), follow[0]) and torch.equal(t.next(5), follow[1])
    t.new_epoch()
    assert torch.equal(t.perm, nxt)


def test_hold_out_makes_a_fixed_balanced_validation_split_of_the_training_images(tiny_npz):
    src, again = load_dataset(f"npz:{tiny_npz}"), load_dataset(f"npz:{tiny_npz}")
    x_all, y_all = src.x_train.copy(), src.y_train.copy()
    hold_out(src, 30)
    hold_out(again, 30)
    assert len(src.y_train) == 66 and len(src.y_test) == 30
    assert np.array_equal(src.x_test, again.x_test)  # one draw, whatever the run's seed
    assert np.bincount(src.y_test).tolist() == [10, 10, 10]
    rows = {x.tobytes() for x in x_all}
    assert {x.tobytes() for x in src.x_test} | {x.tobytes() for x in src.x_train} == rows  # a partition
    assert not {x.tobytes() for x in src.x_test} & {x.tobytes() for x in src.x_train}
    with pytest.raises(UserError, match="must leave training images"):
        hold_out(load_dataset(f"npz:{tiny_npz}"), 96)
    assert y_all.shape == (96,)
