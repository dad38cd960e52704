"""Data sources: IDX files, image folders, array files, digits, embedded patches, torchvision.

Every file is written by the test itself (nothing is downloaded). References are independent of
the code under test: IDX files are packed here with ``struct``, PNGs are written with matplotlib,
and the vectorised patch sampler is compared with a per-patch loop.
"""

from __future__ import annotations

import gzip
import struct
import sys
import types

import numpy as np
import pytest
import torch

from actsparse.config import TrainConfig
from actsparse.data import load_array, load_data, load_idx, read_idx
from actsparse.data.idx import is_idx_path
from actsparse.data.images import read_grey_image
from actsparse.data.patches import natural_patches, sample_patches

# --------------------------------------------------------------------------- IDX

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file, packed independently of actsparse: magic, big-endian int32 dims, big-endian data."""
    code = IDX_CODES[arr.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr, compress=False):
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def cfg(data, **kw):
    return TrainConfig(data=str(data), **kw)


@pytest.fixture
def images_u8():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 7, 6), dtype=np.uint8)  # h != w, so a swap would show


@pytest.mark.parametrize("name,compress", [("imgs-idx3-ubyte", False), ("imgs-idx3-ubyte.gz", True),
                                           ("imgs.idx", False), ("imgs.idx3.gz", True)])
def test_idx_ubyte_images_become_scaled_rows(tmp_path, images_u8, name, compress):
    path = write_idx(tmp_path / name, images_u8, compress)
    ds = load_data(cfg(path))
    assert ds.x.dtype == torch.float32 and ds.x.shape == (5, 42)
    assert ds.image_shape == (7, 6)
    np.testing.assert_array_equal(ds.x.numpy(), images_u8.reshape(5, 42).astype(np.float32) / np.float32(255))
    assert float(ds.x.min()) >= 0 and float(ds.x.max()) <= 1


@pytest.mark.parametrize("dtype", list(IDX_CODES))
def test_read_idx_round_trips_every_type(tmp_path, dtype):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((4, 3, 2)) * 100).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a.idx", arr))
    assert out.dtype == np.dtype(dtype) and out.shape == arr.shape  # native byte order
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 0  # a writable copy, not a view of the file's bytes


def test_idx_float_samples_are_not_rescaled(tmp_path):
    arr = np.random.default_rng(2).standard_normal((6, 10)).astype(np.float32) * 5
    x, shape = load_idx(write_idx(tmp_path / "f.idx.gz", arr, compress=True))
    assert shape is None and x.dtype == np.float32
    np.testing.assert_array_equal(x, arr)
    ds = load_data(cfg(tmp_path / "f.idx.gz"))
    np.testing.assert_array_equal(ds.x.numpy(), arr)


def test_idx_labels_are_not_samples(tmp_path):
    write_idx(tmp_path / "labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    with pytest.raises(ValueError, match="1-D.*labels"):
        load_data(cfg(tmp_path / "labels-idx1-ubyte"))


def test_idx_names():
    for name in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "t10k-images.idx3-ubyte", "a.idx",
                 "a.IDX1.gz"):
        assert is_idx_path(name), name
    for name in ("a.npy", "idx", ".idx", "a.idxx", "ubyte.csv"):
        assert not is_idx_path(name), name


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b"\x01" + b[1:], "not an IDX file.*two zero bytes"),
    (lambda b: b[:2] + b"\x07" + b[3:], "unknown IDX type code 0x07"),
    (lambda b: b[:3], "shorter than the 4-byte magic"),
    (lambda b: b[:4 + 4 * 2], "truncated: the header of a 3-D IDX file needs 16 bytes"),
    (lambda b: b[:-1], "truncated: shape \\(5, 7, 6\\) of uint8 needs 210 data bytes, got 209"),
    (lambda b: b + b"\x00\x00", "wrong size.*2 too many"),
    (lambda b: b[:2] + b"\x08\x00" + b[4:], "0 dimensions"),
])
def test_bad_idx_files_get_clear_errors(tmp_path, images_u8, mutate, match):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(images_u8)))
    with pytest.raises(ValueError, match=match) as info:
        load_data(cfg(path))
    assert str(path) in str(info.value)


def test_truncated_gzip_idx(tmp_path, images_u8):
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(images_u8))[:-12])
    with pytest.raises(ValueError, match="damaged or truncated gzip"):
        read_idx(path)


def test_missing_idx_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="IDX file not found"):
        load_data(cfg(tmp_path / "nope-idx3-ubyte"))


# --------------------------------------------------------------------------- image folders


@pytest.fixture
def image_dir(tmp_path):
    """Three PNGs of different sizes, with the grey images they should read back as."""
    import matplotlib.image as mpimg

    rng = np.random.default_rng(3)
    d = tmp_path / "imgs"
    d.mkdir()
    # grey, written as equal RGB bytes: read back exactly
    g8 = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    mpimg.imsave(d / "im0.png", np.repeat(g8[:, :, None], 3, axis=2))
    # colour: grey = 0.299 R + 0.587 G + 0.114 B
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mpimg.imsave(d / "im1.png", rgb)
    # a float array through the grey colour map (a 256-entry table: within 2/255)
    f = rng.random((30, 18))
    mpimg.imsave(d / "im2.png", f, cmap="gray", vmin=0, vmax=1)
    greys = {
        "im0.png": (g8 / 255.0, 1e-12),
        "im1.png": (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0, 1e-12),
        "im2.png": (f, 2.0 / 255),
    }
    return d, greys


def test_read_grey_image_matches_what_was_written(image_dir):
    d, greys = image_dir
    for name, (g, atol) in greys.items():
        got = read_grey_image(d / name)
        assert got.shape == g.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, g, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("prefix", ["", "folder:"])
def test_image_folder_gives_normalised_patches(image_dir, prefix):
    d, _ = image_dir
    ds = load_data(cfg(f"{prefix}{d}", samples=300, patch_size=8, whiten="1/f"))
    assert ds.x.shape == (300, 64) and ds.image_shape == (8, 8)
    assert float(ds.x.min()) >= 0.1 - 1e-6 and float(ds.x.max()) <= 0.9 + 1e-6
    assert "3 images" in ds.description


def test_image_folder_other_options(image_dir):
    d, _ = image_dir
    plain = load_data(cfg(d, samples=200, patch_size=5, whiten="none", seed=4)).x
    assert plain.shape == (200, 25) and float(plain.min()) >= 0.1 - 1e-6 and float(plain.max()) <= 0.9 + 1e-6
    again = load_data(cfg(d, samples=200, patch_size=5, whiten="none", seed=4)).x
    assert torch.equal(plain, again)  # the seed fixes the patches
    zca = load_data(cfg(d, samples=400, patch_size=4, whiten="zca")).x
    assert zca.shape == (400, 16)
    assert float(zca.mean(0).abs().max()) < 1e-4  # ZCA output: zero mean per pixel


def test_image_folder_hidden_files_are_skipped(image_dir):
    d, _ = image_dir
    (d / ".DS_Store").write_bytes(b"\x00\x01junk")
    assert "3 images" in load_data(cfg(d, samples=50)).description


def test_image_folder_non_image_is_named(image_dir):
    d, _ = image_dir
    (d / "notes.txt").write_text("not an image\n")
    with pytest.raises(ValueError, match="notes.txt is not an image"):
        load_data(cfg(d, samples=50))


def test_image_folder_truncated_png_is_named(image_dir):
    d, _ = image_dir
    (d / "im1.png").write_bytes((d / "im1.png").read_bytes()[:60])
    with pytest.raises(ValueError, match="im1.png is not an image that can be read"):
        load_data(cfg(d, samples=50))


def test_image_folder_errors(tmp_path, image_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_data(cfg(empty))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_data(cfg(f"folder:{tmp_path / 'missing'}"))
    d, _ = image_dir
    with pytest.raises(ValueError, match="smaller than a 20x20 patch"):
        load_data(cfg(d, samples=10, patch_size=20))
    (d / "sub").mkdir()
    with pytest.raises(ValueError, match="sub is a folder"):
        load_data(cfg(d, samples=10))


def test_flat_image_cannot_be_whitened(tmp_path):
    import matplotlib.image as mpimg

    d = tmp_path / "flat"
    d.mkdir()
    mpimg.imsave(d / "flat.png", np.full((12, 12), 0.5), cmap="gray", vmin=0, vmax=1)
    with pytest.raises(ValueError, match="flat.png is a single flat colour"):
        load_data(cfg(d, samples=10))


# --------------------------------------------------------------------------- array files


def _write_array(path, arr):
    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, arr)
    elif suffix == ".npz":
        np.savez(path, first=arr, second=arr[:1])
    elif suffix == ".pt":
        torch.save(torch.from_numpy(arr), path)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"x": arr}, str(path))
    elif suffix == ".csv":
        np.savetxt(path, arr, delimiter=",", fmt="%.9g")


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".safetensors", ".csv"])
def test_array_files_round_trip(tmp_path, suffix):
    arr = np.random.default_rng(5).random((7, 16)).astype(np.float32)
    path = tmp_path / f"a{suffix}"
    _write_array(path, arr)
    np.testing.assert_allclose(load_array(path), arr, rtol=1e-6)
    ds = load_data(cfg(path))
    assert ds.x.shape == (7, 16) and ds.image_shape == (4, 4)  # 16 features: a square guess


def test_array_file_errors(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(5))
    with pytest.raises(ValueError, match="2-D array"):
        load_array(tmp_path / "v.npy")
    (tmp_path / "a.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_array(tmp_path / "a.txt")
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        load_data(cfg(tmp_path / "nan.npy"))


# --------------------------------------------------------------------------- embedded data


def test_digits():
    ds = load_data(cfg("digits"))
    assert ds.x.shape == (1797, 64) and ds.image_shape == (8, 8)
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0


@pytest.mark.parametrize("whiten", ["1/f", "none"])
def test_natural_patches(whiten):
    p = natural_patches(500, 8, whiten, seed=0)
    assert p.shape == (500, 64)
    assert p.min() >= 0.1 - 1e-12 and p.max() <= 0.9 + 1e-12
    assert p.std() > 0.05  # not collapsed onto 0.5
    np.testing.assert_array_equal(p, natural_patches(500, 8, whiten, seed=0))


def test_sample_patches_matches_a_loop_with_the_same_draws():
    # The reference re-draws the positions in the order sample_patches documents (image k takes
    # samples k, k + K, k + 2K, …; rows then columns per image), then cuts each patch one by one.
    # It checks the strided window extraction and the row bookkeeping, not the randomness
    # (the next test checks positions independently of the random stream).
    rng = np.random.default_rng(6)
    images = [rng.random((13, 17)), rng.random((9, 9)), rng.random((20, 11))]
    n, size, seed = 101, 4, 7
    got = sample_patches(images, n, size, seed)

    ref_rng = np.random.default_rng(seed)
    want = np.empty((n, size * size))
    for k, img in enumerate(images):
        rows = [i for i in range(n) if i % len(images) == k]
        r = ref_rng.integers(0, img.shape[0] - size + 1, len(rows))
        c = ref_rng.integers(0, img.shape[1] - size + 1, len(rows))
        for i, rr, cc in zip(rows, r, c):
            want[i] = img[rr:rr + size, cc:cc + size].ravel()
    np.testing.assert_array_equal(got, want)


def test_sample_patches_positions_cover_every_window():
    # Each pixel stores its own (row, column), so a patch's top-left pixel says where it was cut
    # and the rest of the patch must follow from it; every one of the (h-s+1)(w-s+1) positions
    # (edges included) must be drawn, about equally often.
    h, w, s, n = 10, 12, 3, 20_000
    img = np.arange(h * w, dtype=np.float64).reshape(h, w)
    p = sample_patches([img], n, s, seed=0)
    top_left = p[:, 0].astype(int)
    r, c = np.divmod(top_left, w)
    expected = (r[:, None] + np.arange(s)[None, :])[:, :, None] * w + (c[:, None] + np.arange(s))[:, None, :]
    np.testing.assert_array_equal(p, expected.reshape(n, -1))
    counts = np.bincount(r * w + c, minlength=h * w).reshape(h, w)
    valid = counts[: h - s + 1, : w - s + 1]
    assert counts.sum() == valid.sum()  # nothing outside the valid range
    mean = n / valid.size
    assert valid.min() > 0.6 * mean and valid.max() < 1.4 * mean  # ~uniform (±40% at ~250 per cell)


def test_sample_patches_draws_evenly_over_images():
    images = [np.zeros((8, 8)), np.ones((8, 8)), np.full((8, 8), 2.0)]
    p = sample_patches(images, 10, 4, seed=0)
    np.testing.assert_array_equal(p[:, 0], np.arange(10) % 3)


# --------------------------------------------------------------------------- torchvision


def test_torchvision_missing_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ModuleNotFoundError, match="needs torchvision, which is not installed: pip install torchvision"):
        load_data(cfg("torchvision:MNIST:/tmp/data"))


def test_torchvision_bad_spec():
    with pytest.raises(ValueError, match="torchvision:NAME:ROOT"):
        load_data(cfg("torchvision:MNIST"))


@pytest.fixture
def fake_torchvision(monkeypatch, tmp_path):
    """A stand-in ``torchvision.datasets`` with an MNIST-like class (torchvision is not installed here)."""
    data = torch.randint(0, 256, (6, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    class MNIST:
        def __init__(self, root, train=True, download=False):
            assert train and not download
            if root != str(tmp_path):
                raise RuntimeError("Dataset not found. You can use download=True to download it")
            self.data = data

    tv = types.ModuleType("torchvision")
    tv.datasets = types.ModuleType("torchvision.datasets")
    tv.datasets.MNIST = MNIST
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", tv.datasets)
    return data


def test_torchvision_source_with_a_stand_in(fake_torchvision, tmp_path):
    ds = load_data(cfg(f"torchvision:MNIST:{tmp_path}"))
    assert ds.x.shape == (6, 20) and ds.image_shape == (5, 4)
    np.testing.assert_array_equal(ds.x.numpy(), fake_torchvision.reshape(6, 20).numpy().astype(np.float32) / 255)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_data(cfg(f"torchvision:MNIST:{tmp_path / 'elsewhere'}"))
    with pytest.raises(ValueError, match="no data set 'Nope'"):
        load_data(cfg(f"torchvision:Nope:{tmp_path}"))


def test_count_not_finite_in_chunks_matches_a_whole_count():
    """The chunked NaN/Inf count (no whole-array temporaries) against the plain count, for 1-D,
    2-D and 3-D tensors and chunks that do not divide the rows."""
    from actsparse.data import count_not_finite

    g = torch.Generator().manual_seed(0)
    for shape in ((1000,), (1000, 7), (250, 3, 5)):
        x = torch.randn(*shape, generator=g)
        flat = x.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[:37]] = float("nan")
        flat[torch.randperm(flat.numel(), generator=g)[:11]] = float("inf")
        assert count_not_finite(x, chunk_rows=64) == int((~torch.isfinite(x)).sum())
    assert count_not_finite(torch.zeros(10, 3)) == 0
