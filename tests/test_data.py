"""Tests of timm_capsules.data: IDX reading, MNIST sources, DiverseMultiMNIST generation,
the training stream, the datasets builder and the exported Hub-layout folder."""
import gzip
import hashlib
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from timm_capsules.data import diverse_multimnist as dmm
from timm_capsules.data import mnist

FASHION_DIR = Path(mnist.FASHION_MNIST_DEBIAN_DIR)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("MNIST_DIR", raising=False)


@pytest.fixture(scope="module")
def train_digits():
    return mnist.load_sample("train")


@pytest.fixture(scope="module")
def test_digits():
    return mnist.load_sample("test")


def digit_hashes(images: np.ndarray) -> set:
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in images}


def place_alone(digit: np.ndarray, row: int, col: int, size: int = 36) -> np.ndarray:
    """Reference placement, one image at a time with np.pad (independent of the vectorised code)."""
    return np.pad(digit, ((row, size - 28 - row), (col, size - 28 - col))).astype(np.int64)


def bounding_box(image: np.ndarray) -> tuple:
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


# ------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    mnist.write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images)
    mnist.write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels)
    if suffix:  # really compressed, and the header really is big-endian 2051
        assert gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read(4) == (2051).to_bytes(4, "big")
    digits = mnist.load_idx_folder(tmp_path, "test")
    np.testing.assert_array_equal(digits.images, images)
    np.testing.assert_array_equal(digits.labels, labels)
    assert digits.labels.dtype == np.int64 and digits.images.dtype == np.uint8


def test_idx_rejects_wrong_magic(tmp_path):
    path = mnist.write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28), np.uint8))  # 2 dims: 2050
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*magic number is 2050.*expected 2051"):
        mnist.read_idx(path, mnist.IDX_IMAGES_MAGIC)
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + (2).to_bytes(4, "big") + bytes(8))  # float32 dtype byte
    with pytest.raises(ValueError, match="dtype byte is 0x0d"):
        mnist.read_idx(path)


def test_idx_rejects_truncated_file(tmp_path):
    path = mnist.write_idx(tmp_path / "train-images-idx3-ubyte", np.ones((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: IDX file truncated.*\(4, 28, 28\)"):
        mnist.read_idx(path, mnist.IDX_IMAGES_MAGIC)


def test_idx_rejects_count_mismatch(tmp_path):
    mnist.write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
    mnist.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="holds 5 images but .*train-labels-idx1-ubyte.gz holds 4 labels"):
        mnist.load_idx_folder(tmp_path, "train")


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    for split, size in (("train", 60_000), ("test", 10_000)):
        digits = mnist.load_mnist(split, "fashion_mnist")
        assert digits.images.shape == (size, 28, 28) and digits.images.dtype == np.uint8
        assert np.bincount(digits.labels).tolist() == [size // 10] * 10  # balanced classes 0-9
        assert digits.images.max() == 255 and digits.class_names[9] == "Ankle boot"


# ---------------------------------------------------------------------------------------- sources
def test_builtin_sample_banks(train_digits, test_digits):
    assert train_digits.images.shape == (4000, 28, 28) and test_digits.images.shape == (1000, 28, 28)
    assert np.bincount(train_digits.labels).tolist() == [400] * 10
    assert np.bincount(test_digits.labels).tolist() == [100] * 10
    train_hashes, test_hashes = digit_hashes(train_digits.images), digit_hashes(test_digits.images)
    assert len(train_hashes) == 4000 and len(test_hashes) == 1000 and not train_hashes & test_hashes
    assert (Path(mnist.__file__).parent / "MNIST_SAMPLE.md").read_text().count("CC BY-SA 3.0")


def test_source_choice_order(tmp_path, monkeypatch, caplog):
    reachable = {"value": True}
    monkeypatch.setattr(mnist, "hub_is_reachable", lambda: reachable["value"])
    caplog.set_level(logging.INFO, logger=mnist.__name__)
    monkeypatch.setenv("MNIST_DIR", str(tmp_path))
    assert mnist.resolve_source("sample") == "sample"  # explicit beats everything
    assert mnist.resolve_source(None) == str(tmp_path)  # then MNIST_DIR
    assert "from MNIST_DIR" in caplog.text
    monkeypatch.delenv("MNIST_DIR")
    assert mnist.resolve_source("auto") == "hub"  # then the Hub when reachable
    reachable["value"] = False
    assert mnist.resolve_source() == "sample"  # then the built-in sample
    assert "built-in 5k sample" in caplog.text


def test_offline_skips_network_and_hub_failure_falls_back(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to connect although HF_HUB_OFFLINE=1")

    monkeypatch.setattr(socket, "create_connection", no_network)
    assert mnist.hub_is_reachable() is False
    assert mnist.load_mnist("test").source == "sample"
    # Hub answers the probe but the download fails: auto falls back, an explicit "hub" does not.
    monkeypatch.setattr(mnist, "hub_is_reachable", lambda: True)
    monkeypatch.setattr(mnist, "load_hub", lambda split: (_ for _ in ()).throw(ConnectionError("no route")))
    mnist._load_resolved.cache_clear()
    assert mnist.load_mnist("test").source == "sample"
    with pytest.raises(ConnectionError):
        mnist.load_mnist("test", "hub")
    mnist._load_resolved.cache_clear()


# ------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def generated(train_digits):
    return dmm.generate(train_digits, np.arange(3000), seed=3, split="train")


def test_generation_statistics(generated):
    n = len(generated.images)
    single = generated.num_digits == 1
    sigma = np.sqrt(n * (1 / 6) * (5 / 6))
    assert abs(single.sum() - n / 6) < 4 * sigma
    two = ~single
    assert (generated.classes[two, 0] != generated.classes[two, 1]).all()
    assert (generated.classes[single, 1] == -1).all() and (generated.classes[:, 0] >= 0).all()
    # Every ordered class pair occurs: the second class is uniform over the other nine.
    assert len({tuple(pair) for pair in generated.classes[two]}) == 90
    expected = np.zeros((n, 10), np.float32)
    for k, classes in enumerate(generated.classes):
        expected[k, classes[classes >= 0]] = 1
    np.testing.assert_array_equal(generated.targets, expected)
    assert (generated.targets.sum(1) == generated.num_digits).all()
    assert generated.images.shape == (n, 36, 36) and generated.images.dtype == np.uint8


def test_shifts_within_four_pixels(generated, train_digits):
    present = generated.offsets[generated.classes >= 0]  # (digits, 2)
    assert present.min() == 0 and present.max() == 8  # every shift from -4 to +4 is used ...
    assert len(np.unique(present)) == 9
    two = generated.num_digits == 2
    same = (generated.offsets[two, 0] == generated.offsets[two, 1]).all(axis=1)
    assert same.mean() < 0.05  # ... independently per digit (1/81 expected)
    # Single-digit images, checked from the pixels alone: the digit's bounding box moved by <= 4 px.
    for k in np.flatnonzero(~two)[:300]:
        source = train_digits.images[generated.sources[k, 0]]
        moved = np.subtract(bounding_box(generated.images[k]), bounding_box(source))
        assert moved[0] == moved[1] and moved[2] == moved[3]  # a pure translation
        assert 0 <= moved[0] <= 8 and 0 <= moved[2] <= 8, moved


@pytest.mark.parametrize("overlay", ["sum_clip", "max", "mean"])
def test_overlay_rule_pixelwise(train_digits, overlay):
    batch = dmm.generate(train_digits, np.arange(400), seed=5, overlay=overlay)
    saturated = 0
    for k in range(len(batch.images)):
        (r1, c1), (r2, c2) = batch.offsets[k]
        a = place_alone(train_digits.images[batch.sources[k, 0]], r1, c1)
        if batch.num_digits[k] == 1:
            expected = a
        else:
            b = place_alone(train_digits.images[batch.sources[k, 1]], r2, c2)
            saturated += (a + b > 255).sum()
            expected = {"sum_clip": np.minimum(a + b, 255), "max": np.maximum(a, b),
                        "mean": (a + b + 1) // 2}[overlay]
        np.testing.assert_array_equal(batch.images[k], expected, err_msg=f"image {k}")
    assert saturated > 0  # the clipping branch was exercised


def test_train_and_test_use_disjoint_source_digits(train_digits, test_digits):
    train = dmm.make_split("train", 1500, source="sample", seed=0)
    test = dmm.make_split("test", 1500, source="sample", seed=0)
    # Rebuild every test image from the test bank alone: the test split really uses test digits.
    for k in range(0, 1500, 7):
        (r1, c1), (r2, c2) = test.offsets[k]
        image = place_alone(test_digits.images[test.sources[k, 0]], r1, c1)
        if test.num_digits[k] == 2:
            image = np.minimum(image + place_alone(test_digits.images[test.sources[k, 1]], r2, c2), 255)
        np.testing.assert_array_equal(test.images[k], image)
    used_train = digit_hashes(train_digits.images[train.sources[train.sources >= 0]])
    used_test = digit_hashes(test_digits.images[test.sources[test.sources >= 0]])
    assert len(used_train) > 1000 and len(used_test) > 500 and not used_train & used_test


def test_generation_independent_of_chunking_and_order(train_digits):
    whole = dmm.generate(train_digits, np.arange(500), seed=9)
    order = np.random.default_rng(0).permutation(500)
    shuffled = dmm.generate(train_digits, order, seed=9)
    np.testing.assert_array_equal(shuffled.images, whole.images[order])
    np.testing.assert_array_equal(dmm.generate(train_digits, np.arange(200, 300), seed=9).images,
                                  whole.images[200:300])
    other = dmm.generate(train_digits, np.arange(500), seed=10)
    assert (other.images != whole.images).any(axis=(1, 2)).mean() > 0.99
    test_split = dmm.generate(mnist.load_sample("test"), np.arange(500), seed=9, split="test")
    assert (test_split.num_digits != whole.num_digits).any()  # the split keys the randomness too


# ------------------------------------------------------------------------------------------ stream
def stream_images(stream, workers=0, batched=False):
    loader = torch.utils.data.DataLoader(stream, batch_size=None if batched else 50, num_workers=workers)
    images, targets = zip(*loader)
    return torch.cat(images), torch.cat(targets)


def as_multiset(images: torch.Tensor) -> list:
    return sorted(hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images)


def test_stream_samples_match_generator(train_digits):
    stream = dmm.DiverseMultiMNISTStream(digits=train_digits, seed=2, num_samples=300, chunk_size=128)
    images, targets = stream_images(stream)
    reference = dmm.generate(train_digits, np.arange(300), seed=2)
    assert images.shape == (300, 1, 36, 36) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    np.testing.assert_array_equal((images[:, 0] * 255).round().byte().numpy(), reference.images)
    np.testing.assert_array_equal(targets.numpy(), reference.targets)


def test_stream_workers_give_same_images(train_digits):
    sample_mode = dict(digits=train_digits, seed=4, num_samples=400, chunk_size=64)
    one, _ = stream_images(dmm.DiverseMultiMNISTStream(**sample_mode), workers=1)
    two, _ = stream_images(dmm.DiverseMultiMNISTStream(**sample_mode), workers=2)
    assert len(one) == len(two) == 400 and as_multiset(one) == as_multiset(two)
    batch_mode = dict(digits=train_digits, seed=4, num_samples=400, batch_size=32, chunk_size=64)
    one, _ = stream_images(dmm.DiverseMultiMNISTStream(**batch_mode), workers=1, batched=True)
    two, _ = stream_images(dmm.DiverseMultiMNISTStream(**batch_mode), workers=2, batched=True)
    assert torch.equal(one, two)  # batch mode: even the order is the same
    other, _ = stream_images(dmm.DiverseMultiMNISTStream(**{**batch_mode, "seed": 5}), batched=True)
    assert not set(as_multiset(other)) & set(as_multiset(one))


@pytest.mark.parametrize("batch_size, start, workers", [(None, 137, 0), (16, 7, 0), (16, 7, 2)])
def test_stream_resume_is_the_tail(train_digits, batch_size, start, workers):
    options = dict(digits=train_digits, seed=6, num_samples=320, batch_size=batch_size, chunk_size=64)
    full, full_targets = stream_images(dmm.DiverseMultiMNISTStream(**options), batched=batch_size is not None)
    tail, tail_targets = stream_images(dmm.DiverseMultiMNISTStream(**options, start=start), workers=workers,
                                       batched=batch_size is not None)
    skipped = start * (batch_size or 1)
    assert torch.equal(tail, full[skipped:]) and torch.equal(tail_targets, full_targets[skipped:])


def test_stream_resume_generates_nothing_it_skips(train_digits, monkeypatch):
    generated_indices = []
    real_generate = dmm.generate
    monkeypatch.setattr(dmm, "generate", lambda digits, indices, **kw: (
        generated_indices.append(np.asarray(indices)), real_generate(digits, indices, **kw))[1])
    stream = dmm.DiverseMultiMNISTStream(digits=train_digits, batch_size=8, start=10**9, chunk_size=8)
    next(iter(stream))
    assert np.concatenate(generated_indices).min() == 8 * 10**9


def test_stream_ranks_are_disjoint(train_digits):
    options = dict(digits=train_digits, seed=8, num_samples=200, batch_size=25)
    ranks = [stream_images(dmm.DiverseMultiMNISTStream(**options, rank=r, world_size=2), batched=True)[0]
             for r in (0, 1)]
    assert not set(as_multiset(ranks[0])) & set(as_multiset(ranks[1]))
    single, _ = stream_images(dmm.DiverseMultiMNISTStream(**{**options, "num_samples": 400}), batched=True)
    assert as_multiset(torch.cat(ranks)) == as_multiset(single)  # together: the one-process stream


# ----------------------------------------------------------------------------- builder and export
def builder_arrays(tmp_path, **config):
    builder = dmm.DiverseMultiMNIST(cache_dir=str(tmp_path), source="sample", **config)
    builder.download_and_prepare()
    return {split: builder.as_dataset(split).with_format("numpy")[:] for split in ("train", "test")}


def test_builder_deterministic_and_matches_make_split(tmp_path):
    config = dict(train_size=300, test_size=200, seed=11)
    first = builder_arrays(tmp_path / "a", **config)
    second = builder_arrays(tmp_path / "b", **config)
    for split in ("train", "test"):
        assert first[split]["image"].tobytes() == second[split]["image"].tobytes()
    reference = dmm.make_split("test", 200, source="sample", seed=11)
    np.testing.assert_array_equal(first["test"]["image"], reference.images)
    np.testing.assert_array_equal(first["test"]["target"], reference.targets)
    for labels, target in zip(first["test"]["labels"], first["test"]["target"]):
        assert list(labels) == np.flatnonzero(target).tolist()
    other = builder_arrays(tmp_path / "c", **{**config, "seed": 12})
    assert first["train"]["image"].tobytes() != other["train"]["image"].tobytes()


def test_image_feature_round_trips(tmp_path):
    dataset = dmm.load_diverse_multimnist("test", cache_dir=tmp_path, source="sample", train_size=0,
                                          test_size=40, image_feature="image")
    reference = dmm.make_split("test", 40, source="sample")
    images = np.stack([np.asarray(example["image"]) for example in dataset])
    np.testing.assert_array_equal(images, reference.images)
    streamed = dmm.load_diverse_multimnist("test", streaming=True, cache_dir=tmp_path, source="sample", test_size=40)
    np.testing.assert_array_equal(np.asarray(next(iter(streamed))["image"]), reference.images[0])


def test_export_loads_with_plain_load_dataset(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import DatasetCard

    out = tmp_path / "diverse_multimnist"
    dmm.main(["export", str(out), "--source", "sample", "--train-size", "120", "--test-size", "80",
              "--seed", "1", "--cache-dir", str(tmp_path / "cache")])
    assert sorted(p.name for p in (out / "data").iterdir()) == ["test-00000-of-00001.parquet",
                                                                 "train-00000-of-00001.parquet"]
    expected_features = dmm.DiverseMultiMNIST(cache_dir=str(tmp_path / "cache"), source="sample").info.features
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    loaded = datasets.load_dataset("diverse_multimnist")  # by name, from the parent directory
    assert {split: len(ds) for split, ds in loaded.items()} == {"train": 120, "test": 80}
    assert loaded["test"].features == expected_features
    reference = dmm.make_split("test", 80, source="sample", seed=1)
    np.testing.assert_array_equal(loaded["test"].with_format("numpy")["image"], reference.images)
    streamed = datasets.load_dataset(str(out), split="test", streaming=True)
    first = next(iter(streamed))
    assert streamed.features == expected_features
    np.testing.assert_array_equal(np.asarray(first["image"], np.uint8), reference.images[0])
    card = DatasetCard.load(out / "README.md")
    splits = {entry["split"] for entry in card.data.configs[0]["data_files"]}
    assert splits == {"train", "test"} and card.data.license == "cc-by-sa-3.0"
    assert "dataset_info" in card.data.to_dict() and "Tsai" in card.text


def test_preview_writes_png(tmp_path):
    out = dmm.preview(tmp_path / "grid.png", count=10, source="sample", columns=5)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
