"""Every loader reads a small fixture written here in its format; bad paths and files give one clear error."""

import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nas.data import load_dataset
from nas.datasets import DataError, DataFormatError, DataNotFoundError
from nas.synthetic import make_synthetic

RNG = np.random.default_rng(0)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder, n=40, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, count in (("train", n), ("t10k", n // 4)):
        arrays[prefix] = RNG.integers(0, 256, (count, 28, 28)), RNG.integers(0, 10, count)
        for part, suffix, array in (("images", "idx3", arrays[prefix][0]), ("labels", "idx1", arrays[prefix][1])):
            name = f"{prefix}-{part}-{suffix}-ubyte"
            data = idx_bytes(array)
            (folder / (name + ".gz")).write_bytes(gzip.compress(data)) if gz else (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    arrays = write_fashion(tmp_path, gz=gz)
    data = load_dataset("fashion-mnist", data_dir=tmp_path, val_fraction=0.25)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 10)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 28, 28)
    assert (data.num_classes, data.in_channels, data.image_size, data.flip_ok) == (10, 1, 28, True)
    assert data.superclasses is None and data.class_names[9] == "Ankle boot"
    np.testing.assert_array_equal(data.test.images[:, 0].numpy(), arrays["t10k"][0])
    # train + val is a permutation of the training file
    together = torch.cat([data.train.labels, data.val.labels]).sort().values.numpy()
    np.testing.assert_array_equal(together, np.sort(arrays["train"][1]))


def test_data_dir_comes_from_the_environment_and_may_be_a_parent(tmp_path, monkeypatch):
    write_fashion(tmp_path / "fashion-mnist")
    monkeypatch.setenv("VMOE_NAS_DATA_DIR", str(tmp_path))
    assert len(load_dataset("fashion-mnist").test) == 10


def test_split_is_seeded_and_limit_caps_train_only(tmp_path):
    write_fashion(tmp_path, n=80)
    a, b = (load_dataset("fashion-mnist", data_dir=tmp_path, seed=1) for _ in range(2))
    c = load_dataset("fashion-mnist", data_dir=tmp_path, seed=2)
    assert torch.equal(a.val.images, b.val.images) and not torch.equal(a.val.images, c.val.images)
    limited = load_dataset("fashion-mnist", data_dir=tmp_path, seed=1, limit=10)
    assert len(limited.train) == 10 and torch.equal(limited.val.images, a.val.images)
    assert torch.equal(limited.train.images, a.train.images[:10])


def test_normalize_gives_zero_mean_unit_std_on_train():
    data = load_dataset("synthetic:size=8,train=500,test=10")
    x = data.normalize(data.train.images)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3


def write_cifar_batch(path, n, fine_key=b"labels", coarse=False):
    batch = {b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8)}
    fine = RNG.integers(0, 100 if coarse else 10, n)
    batch[fine_key] = fine.tolist()
    if coarse:
        batch[b"coarse_labels"] = (fine // 5).tolist()  # fixture rule: 5 fine classes per coarse class
    path.write_bytes(pickle.dumps(batch))
    return batch


def test_cifar10_reads_python_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [write_cifar_batch(folder / f"data_batch_{i}", 6) for i in range(1, 6)]
    write_cifar_batch(folder / "test_batch", 4)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    data = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.2)
    assert (len(data.train), len(data.val), len(data.test), data.in_channels, data.image_size) == (24, 6, 4, 3, 32)
    assert data.class_names[3] == "c3" and data.superclasses is None
    first = torch.from_numpy(batches[0][b"data"][0].reshape(3, 32, 32))
    assert any(torch.equal(first, image) for image in torch.cat([data.train.images, data.val.images]))


def test_cifar100_brings_its_coarse_labels_as_superclasses(tmp_path):
    write_cifar_batch(tmp_path / "train", 300, fine_key=b"fine_labels", coarse=True)
    write_cifar_batch(tmp_path / "test", 10, fine_key=b"fine_labels", coarse=True)
    names = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
             b"coarse_label_names": [f"g{i}".encode() for i in range(20)]}
    (tmp_path / "meta").write_bytes(pickle.dumps(names))
    data = load_dataset("cifar100", data_dir=tmp_path)
    assert data.num_classes == 100 and len(data.test) == 10
    seen = np.unique(torch.cat([data.train.labels, data.val.labels]).numpy())
    np.testing.assert_array_equal(data.superclasses[seen], seen // 5)


def test_imagefolder_reads_png_and_jpeg_per_class_folders(tmp_path):
    for split, n in (("train", 4), ("test", 1)):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = RNG.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    data = load_dataset(f"imagefolder:{tmp_path}", val_fraction=0.25)
    assert data.class_names == ("cat", "dog") and (data.in_channels, data.image_size) == (3, 12)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 2)
    assert sorted(torch.cat([data.train.labels, data.val.labels]).tolist()) == [0] * 4 + [1] * 4


def test_imagefolder_without_test_folder_has_empty_test_split(tmp_path):
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"c{c}" / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.in_channels == 1 and len(data.test) == 0 and len(data.train) + len(data.val) == 6


@pytest.mark.slow
def test_imagefolder_reads_more_images_than_open_files_allowed(tmp_path):
    """Each image is opened, read and closed in turn (400 images once failed with 'Too many open files')."""
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(150):
            Image.fromarray(np.full((4, 4), i, np.uint8)).save(tmp_path / f"c{c}" / f"{i}.png")
    code = f"""if True:
        import resource
        from nas.data import load_dataset
        import PIL.PngImagePlugin  # imported before the limit: the test is about image files, not modules
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        data = load_dataset("imagefolder:{tmp_path}")
        print(len(data.train) + len(data.val))
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0 and done.stdout.split() == ["300"], done.stderr[-2000:]


def test_imagefolder_mixes_grey_and_colour_as_rgb(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.full((6, 6), 90, np.uint8)).save(tmp_path / "a" / "grey.png")
    Image.fromarray(np.full((12, 12, 3), (10, 20, 30), np.uint8)).save(tmp_path / "b" / "colour.png")
    data = load_dataset(f"imagefolder:{tmp_path}", val_fraction=0.5)
    images = {label: image for split in (data.train, data.val)
              for image, label in zip(split.images, split.labels.tolist())}
    assert data.in_channels == 3 and data.image_size == 6  # the first image's size
    assert images[0].flatten().unique().tolist() == [90] and images[1][:, 0, 0].tolist() == [10, 20, 30]


def test_a_cifar_pickle_that_calls_a_function_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(DataFormatError, match="refusing .*system"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps([1, 2]))  # a pickle, but not a CIFAR batch
    with pytest.raises(DataFormatError, match="no b'data' entry"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("protocol, numpy1", [(2, True), (2, False), (5, False)])
def test_cifar_pickles_of_any_numpy_and_protocol_load(tmp_path, protocol, numpy1):
    """The distributed files were written by Python 2 and numpy 1 (numpy.core); numpy 2 writes numpy._core."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = write_cifar_batch(folder / name, 3)
        data = pickle.dumps(batch, protocol=protocol)  # protocol 2 names globals as text lines: renamed safely
        (folder / name).write_bytes(data.replace(b"numpy._core.", b"numpy.core.") if numpy1 else data)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, 2))
    assert len(load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.2).test) == 3


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_reads_x_y_and_optional_superclass(tmp_path, layout):
    x = RNG.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
    stored = {"nhw": x[:, 0], "nhwc": x.transpose(0, 2, 3, 1), "nchw": x}[layout]
    y = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", x=stored, y=y, superclass=np.array([0, 0, 1, 1]), x_test=stored[:5], y_test=y[:5])
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}", val_fraction=0.25)
    expected = x[:, :1] if layout == "nhw" else x
    assert data.train.images.shape[1:] == expected.shape[1:] and data.num_classes == 4
    np.testing.assert_array_equal(data.test.images.numpy(), expected[:5])
    np.testing.assert_array_equal(data.superclasses, [0, 0, 1, 1])


def test_synthetic_has_a_planted_hierarchy_and_is_deterministic():
    raw = make_synthetic(size=8, classes=6, groups=3, train=300, test=30, seed=3)
    assert sorted(np.bincount(raw.superclasses).tolist()) == [2, 2, 2]
    again = make_synthetic(size=8, classes=6, groups=3, train=300, test=30, seed=3)
    np.testing.assert_array_equal(raw.x, again.x)
    # Images of one super-class are closer to each other than to other super-classes' images.
    means = np.stack([raw.x[raw.y == c].astype(float).mean(0).ravel() for c in range(6)])
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    same = raw.superclasses[:, None] == raw.superclasses[None]
    assert dist[same & ~np.eye(6, dtype=bool)].max() < dist[~same].min()
    data = load_dataset("synthetic:size=12,channels=3,classes=6,groups=2,train=100,test=20")
    assert (data.image_size, data.in_channels, data.num_classes, len(data.test)) == (12, 3, 6, 20)
    assert not data.flip_ok


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fashion-mnist", "looked in {tmp}"),
        ("cifar10", "looked in {tmp}"),
        ("cifar100", "looked in {tmp}"),
        ("imagefolder:{tmp}/none", "{tmp}/none"),
        ("npz:{tmp}/none.npz", "{tmp}/none.npz"),
    ],
)
def test_missing_data_says_where_it_looked(tmp_path, name, expected):
    with pytest.raises(DataNotFoundError, match="expected|looked") as error:
        load_dataset(name.format(tmp=tmp_path), data_dir=tmp_path)
    assert expected.format(tmp=tmp_path) in str(error.value)


def test_malformed_files_give_format_errors(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((40, 28, 28)))[:-5]))
    with pytest.raises(DataFormatError, match="truncated"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="not a readable .npz"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    np.savez(tmp_path / "nox.npz", y=np.zeros(3))
    with pytest.raises(DataFormatError, match="lacks array"):
        load_dataset(f"npz:{tmp_path / 'nox.npz'}")
    (tmp_path / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="not a CIFAR python pickle"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize(
    "name, options",
    [("mnist-9000", {}), ("synthetic:size=big", {}), ("synthetic:colour=2", {}), ("synthetic", {"limit": 0}),
     ("synthetic", {"val_fraction": 1.0}), ("synthetic:train=3", {"val_fraction": 0.9})],
)
def test_unknown_names_options_and_empty_splits_are_data_errors(name, options):
    with pytest.raises(DataError):
        load_dataset(name, **options)
