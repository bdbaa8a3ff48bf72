import csv
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import common
import tools
from common import (DATASET_SPECS, ConfigError, ImageFolder, augment_small, eval_batches, load_small, normalize,
                    small_batches)

REPO = Path(__file__).resolve().parents[1]

FMNIST = REPO / "data" / "fashion-mnist"


# ---- Fashion-MNIST -------------------------------------------------------


def test_fashion_mnist_loads():
    x_train, y_train, x_test, y_test = load_small("fashion_mnist", FMNIST)
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x_train.dtype == x_test.dtype == np.uint8
    assert y_train.dtype == y_test.dtype == np.int32
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    spec = DATASET_SPECS["fashion_mnist"]
    assert spec.shape == x_train.shape[1:] and spec.num_classes == 10
    assert abs(x_train.mean() - spec.mean[0]) < 0.01
    assert abs(x_train.std() - spec.std[0]) < 0.01


def test_fashion_mnist_checksum_mismatch(tmp_path):
    bad = tmp_path / "fashion-mnist"
    shutil.copytree(FMNIST, bad)
    f = bad / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="SHA-256.*--data-dir"):
        load_small("fashion_mnist", tmp_path)
    f.unlink()
    with pytest.raises(ConfigError, match="missing"):
        load_small("fashion_mnist", bad)


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="--dataset"):
        load_small("mnist")


# ---- CIFAR-10 ------------------------------------------------------------


def _write_cifar_batch(path, images, labels):
    # Same layout as the real files: Python 2 pickle (protocol 2), bytes keys,
    # uint8 rows of 3072 = R plane, G plane, B plane, row-major.
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    d = {
        b"batch_label": b"fixture",
        b"labels": [int(v) for v in labels],
        b"data": rows,
        b"filenames": [b"img%d.png" % i for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def test_cifar10_fixture(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = rng.integers(0, 256, (6, 24, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (6, 24))
    for i in range(5):
        _write_cifar_batch(folder / f"data_batch_{i + 1}", images[i], labels[i])
    _write_cifar_batch(folder / "test_batch", images[5], labels[5])

    for data_dir in (tmp_path, folder):
        x_train, y_train, x_test, y_test = load_small("cifar10", data_dir)
        assert x_train.shape == (120, 32, 32, 3) and x_test.shape == (24, 32, 32, 3)
        assert x_train.dtype == np.uint8 and y_train.dtype == y_test.dtype == np.int32
        np.testing.assert_array_equal(x_train, images[:5].reshape(120, 32, 32, 3))
        np.testing.assert_array_equal(y_train, labels[:5].reshape(-1))
        np.testing.assert_array_equal(x_test, images[5])
        np.testing.assert_array_equal(y_test, labels[5])


def test_cifar10_download_is_verified_and_extracted(tmp_path, monkeypatch):
    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    images = np.random.default_rng(1).integers(0, 256, (6, 3, 32, 32, 3), dtype=np.uint8)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        _write_cifar_batch(src / name, images[i], [i] * 3)
    archive = tmp_path / "fixture.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    payload = archive.read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))
    # A corrupted download is rejected ...
    monkeypatch.setitem(load_small.__globals__, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(ConfigError, match="md5"):
        load_small("cifar10", tmp_path / "dl")
    # ... and a good one is kept and extracted.
    monkeypatch.setitem(load_small.__globals__, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    x_train, y_train, x_test, y_test = load_small("cifar10", tmp_path / "dl")
    np.testing.assert_array_equal(x_train, images[:5].reshape(15, 32, 32, 3))
    np.testing.assert_array_equal(y_test, [5, 5, 5])
    assert (tmp_path / "dl" / "cifar-10-python.tar.gz").read_bytes() == payload


def test_cifar10_missing_without_network(tmp_path, monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConfigError, match="--data-dir") as e:
        load_small("cifar10", tmp_path / "nowhere")
    assert "cifar-10-python.tar.gz" in str(e.value)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]


# ---- small_batches / eval_batches ----------------------------------------


def _toy(n=103):
    # Label i marks example i; pixels repeat it so images and labels stay paired.
    y = np.arange(n, dtype=np.int32)
    x = np.broadcast_to(y.astype(np.uint8)[:, None, None, None], (n, 4, 4, 1)).copy()
    return x, y


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, b))


def test_small_batches_epochs_are_fresh_permutations():
    x, y = _toy()
    batches = list(small_batches(x, y, 10, seed=3, num_epochs=3))
    assert len(batches) == 30  # 103 // 10 per epoch, remainder dropped
    for xb, yb in batches:
        assert xb.shape == (10, 4, 4, 1) and xb.dtype == np.uint8 and yb.dtype == np.int32
        np.testing.assert_array_equal(xb[:, 0, 0, 0], yb.astype(np.uint8))
    epochs = [np.concatenate([b[1] for b in batches[e * 10 : (e + 1) * 10]]) for e in range(3)]
    for ep in epochs:
        assert len(set(ep.tolist())) == 100 and ep.min() >= 0 and ep.max() < 103
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert _same(batches, list(small_batches(x, y, 10, seed=3, num_epochs=3)))
    assert not np.array_equal(epochs[0], next(small_batches(x, y, 100, seed=4, num_epochs=1))[1])
    ordered = next(small_batches(x, y, 100, seed=3, num_epochs=1, shuffle=False))[1]
    np.testing.assert_array_equal(ordered, np.arange(100))


@pytest.mark.parametrize("k", [1, 9, 10, 23])
def test_small_batches_resume_is_the_tail(k):
    x, y = _toy()
    full = list(small_batches(x, y, 10, seed=7, num_epochs=3))
    tail = list(small_batches(x, y, 10, seed=7, num_epochs=3, start_step=k))
    assert _same(tail, full[k:])
    it = small_batches(x, y, 10, seed=7, num_epochs=None, start_step=k)
    assert _same([next(it) for _ in range(40 - k)], list(small_batches(x, y, 10, seed=7, num_epochs=4))[k:])


def _as_process(monkeypatch, index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def test_small_batches_process_shards_are_disjoint(monkeypatch):
    x, y = _toy()
    per_process = []
    for index in range(2):
        _as_process(monkeypatch, index, 2)
        per_process.append(list(small_batches(x, y, 10, seed=5, num_epochs=2)))
    a, b = per_process
    assert len(a) == len(b) == 20  # 103 -> 102 -> 51 per process -> 10 batches of 5 per epoch
    assert all(len(batch[1]) == 5 for batch in a + b)
    for e in range(2):
        ya = np.concatenate([t[1] for t in a[e * 10 : (e + 1) * 10]])
        yb = np.concatenate([t[1] for t in b[e * 10 : (e + 1) * 10]])
        assert len(set(ya.tolist()) | set(yb.tolist())) == 100
    with pytest.raises(ConfigError, match="--batch-size"):
        small_batches(x, y, 11, seed=5, num_epochs=1)


def test_eval_batches_in_order_and_sharded(monkeypatch):
    x, y = _toy()
    batches = list(eval_batches(x, y, 10))
    assert [len(t[1]) for t in batches] == [10] * 10 + [3]
    np.testing.assert_array_equal(np.concatenate([t[1] for t in batches]), y)
    np.testing.assert_array_equal(np.concatenate([t[0] for t in batches]), x)
    seen = []
    for index in range(2):
        _as_process(monkeypatch, index, 2)
        seen.append(np.concatenate([t[1] for t in eval_batches(x, y, 10)]))
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(np.concatenate(seen).tolist()) == list(range(103))


# ---- device-side augmentation --------------------------------------------


def test_augment_small_is_reflect_pad_crop_and_flip():
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    augment = jax.jit(augment_small)
    out = np.asarray(augment(jax.random.key(0), x))
    assert out.shape == x.shape and out.dtype == np.uint8
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    found = []
    for i in range(len(x)):
        hits = []
        for dy in range(9):
            for dx in range(9):
                window = padded[i, dy : dy + 32, dx : dx + 32]
                hits += [(dy, dx, False)] if np.array_equal(out[i], window) else []
                hits += [(dy, dx, True)] if np.array_equal(out[i], window[:, ::-1]) else []
        assert len(hits) == 1, f"example {i} is not one translated (flipped) window"
        found.append(hits[0])
    assert {f[2] for f in found} == {False, True}
    assert len({f[:2] for f in found}) > 5
    assert any(f != (4, 4, False) for f in found)
    # The same key gives the same augmentation; another key a different one.
    np.testing.assert_array_equal(out, np.asarray(augment(jax.random.key(0), x)))
    assert not np.array_equal(out, np.asarray(augment(jax.random.key(1), x)))


def test_normalize_is_channel_first():
    x = np.random.default_rng(1).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    mean, std = DATASET_SPECS["cifar10"].mean, DATASET_SPECS["cifar10"].std
    out = np.asarray(normalize(x, mean, std))
    assert out.shape == (2, 3, 5, 6) and out.dtype == np.float32
    want = (x[1, 4, 2, 2] - mean[2]) / std[2]
    assert abs(out[1, 2, 4, 2] - want) < 1e-5


# ---- ImageNet ------------------------------------------------------------

# Written out of order; labels follow the sorted wnids. Class k is grey level
# 20 + 45 k plus a ramp of up to 20 (so crops and flips differ).
WNIDS = ("n04", "n01", "n03", "n00", "n02")


@pytest.fixture
def imagenet_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in WNIDS:
            d = tmp_path / split / wnid
            d.mkdir(parents=True)
            for i in range(4):
                h, w = rng.integers(50, 320, 2)
                level = 20 + 45 * sorted(WNIDS).index(wnid)
                row = (level + np.linspace(0, 20, w)).astype(np.uint8)
                Image.fromarray(np.broadcast_to(row[None, :, None], (h, w, 3)).copy()).save(d / f"{wnid}_{i}.JPEG")
    (tmp_path / "train" / "n02" / "n02_corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return tmp_path


def _labels_match_pixels(xb, yb):
    level = xb.reshape(len(xb), -1).mean(1)
    return np.array_equal(np.abs(level[:, None] - (30 + 45 * np.arange(5))).argmin(1), yb)


def test_imagenet_train(imagenet_dir, caplog):
    with caplog.at_level(logging.WARNING):
        batches = list(ImageFolder(imagenet_dir, workers=0).train(4, seed=0, num_epochs=1))
    assert len(batches) == 5  # 20 readable images
    for xb, yb in batches:
        assert xb.shape == (4, 224, 224, 3) and xb.dtype == np.uint8 and yb.dtype == np.int32
        assert _labels_match_pixels(xb, yb)
    assert sorted(np.concatenate([b[1] for b in batches]).tolist()) == sorted(list(range(5)) * 4)
    bad = [r for r in caplog.records if "n02_corrupt.JPEG" in r.getMessage()]
    assert len(bad) == 1 and bad[0].levelno == logging.WARNING
    again = list(ImageFolder(imagenet_dir, workers=0).train(4, seed=0, num_epochs=1))
    assert _same(batches, again)


def test_imagenet_train_resume(imagenet_dir):
    (imagenet_dir / "train" / "n02" / "n02_corrupt.JPEG").unlink()  # resume is exact only without skips
    full = list(ImageFolder(imagenet_dir, workers=0).train(4, seed=1, num_epochs=2))
    assert len(full) == 10
    tail = list(ImageFolder(imagenet_dir, workers=0).train(4, seed=1, num_epochs=2, start_step=7))
    assert _same(tail, full[7:])


def test_imagenet_val(imagenet_dir, caplog):
    with caplog.at_level(logging.WARNING):
        batches = list(ImageFolder(imagenet_dir, workers=0).test(6))
    assert [len(b[1]) for b in batches] == [6, 6, 6, 2]
    assert np.concatenate([b[1] for b in batches]).tolist() == sorted(list(range(5)) * 4)
    for xb, yb in batches:
        assert xb.shape[1:] == (224, 224, 3) and xb.dtype == np.uint8 and yb.dtype == np.int32
        assert _labels_match_pixels(xb, yb)
    assert not [r for r in caplog.records if "unreadable" in r.getMessage()]


def test_imagenet_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="--data-dir"):
        ImageFolder(tmp_path)
    with pytest.raises(ConfigError, match="needs --data-dir: a folder holding train/<class>"):
        ImageFolder(None)


def test_imagenet_classes_and_subset_come_from_the_folder(imagenet_dir):
    (imagenet_dir / "train" / "n02" / "n02_corrupt.JPEG").unlink()
    data = ImageFolder(imagenet_dir, workers=0)
    assert data.spec.num_classes == 5 and (data.n_train, data.n_test) == (20, 20)
    small = ImageFolder(imagenet_dir, train_subset=7, test_subset=6, workers=0)
    assert (small.n_train, small.n_test) == (7, 6)
    again = ImageFolder(imagenet_dir, train_subset=7, workers=0)  # a fixed subset, the same for every run
    assert list(again.sources["train"].rel) == list(small.sources["train"].rel)
    assert sum(len(b[1]) for b in small.train(2, seed=0, num_epochs=1)) == 6  # 3 batches of 2, one image left
    cfg = common.for_dataset("imagenet", model="tiny", train_subset=7)
    assert common.load_data(cfg, workers=0, data_dir=imagenet_dir).n_train == 7


def test_label_noise_moves_a_fixed_fraction_to_other_classes():
    y = np.repeat(np.arange(10, dtype=np.int32), 100)
    noisy = common._noisy(y, 0.3, 10)
    assert (noisy != y).sum() == 300 and noisy.min() >= 0 and noisy.max() <= 9
    np.testing.assert_array_equal(noisy, common._noisy(y, 0.3, 10))  # the same for every run
    counts = np.bincount((noisy - y)[noisy != y] % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 15  # moved to every other class


# ---- --image-size ------------------------------------------------------------


def test_image_size_sets_the_pipeline_shapes(imagenet_dir):
    data = ImageFolder(imagenet_dir, workers=0, image_size=64)
    assert data.spec.shape == (64, 64, 3)
    for xb, yb in list(data.train(4, seed=0, num_epochs=1)) + list(data.test(6)):
        assert xb.shape[1:] == (64, 64, 3) and xb.dtype == np.uint8 and _labels_match_pixels(xb, yb)
    assert tools.probe_batch(data, 3)[0].shape == (3, 64, 64, 3)
    cfg = common.for_dataset("imagenet", model="tiny", image_size=48)
    assert common.load_data(cfg, workers=0, data_dir=imagenet_dir).spec.shape == (48, 48, 3)


def test_image_size_eval_is_resize_and_centre_crop(tmp_path):
    """The eval transform at size S equals an independent reference: decode at full size, resize the
    shorter side to round(S × 256/224), centre-crop S. Noise images of 60-105 px (no reduced decoding
    below 2 × 55 px), so any shifted or rescaled sample point shows; the two differ by rounding."""
    assert [common.eval_resize(s) for s in (224, 128, 64, 48)] == [256, 146, 73, 55]
    rng = np.random.default_rng(0)
    for i in range(8):
        h, w = rng.integers(60, 106, 2)
        path = tmp_path / f"{i}.JPEG"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
        with Image.open(path) as im:
            im = im.convert("RGB")
        w, h = max(48, round(w * 55 / min(w, h))), max(48, round(h * 55 / min(w, h)))
        left, top = (w - 48) // 2, (h - 48) // 2
        want = np.asarray(im.resize((w, h), Image.BILINEAR).crop((left, top, left + 48, top + 48)), np.float32)
        got, y = common._imagenet_eval((str(path), 3), 48)
        assert got.shape == (48, 48, 3) and y == 3
        assert np.abs(got.astype(np.float32) - want).max() <= 2


def test_image_size_is_checked_and_imagenet_only():
    common.validate(common.for_dataset("imagenet", model="tiny", image_size=32))
    with pytest.raises(ConfigError, match="--image-size"):
        common.validate(common.for_dataset("imagenet", model="tiny", image_size=16))
    with pytest.raises(ConfigError, match="--image-size: applies to --dataset imagenet only"):
        common.validate(common.for_dataset("cifar10", model="tiny", image_size=64))


def test_a_column_missing_from_an_older_csv_means_the_default():
    """A row written before a field existed (image_size, schedule) has the identity of the row with the
    field's default, and not that of another value: whether the column is absent, or empty because the
    CSV's header gained it later."""
    row = {k: str(v) for k, v in common.identity(common.SETUPS["fashion_mnist"], 3).items()}
    old = {k: v for k, v in row.items() if k not in ("image_size", "schedule")}
    assert common.row_key(old) == common.row_key(row)
    assert common.row_key(row | {"image_size": "", "schedule": ""}) == common.row_key(row)
    assert common.varying([row, row | {"image_size": ""}]) == []
    assert common.row_key(old) != common.row_key(row | {"image_size": "64"})
    assert common.row_key(old) != common.row_key(row | {"schedule": "other"})


# ---- reencode ------------------------------------------------------------------


def _files(root):
    return sorted(str(p.relative_to(root)) for split in ("train", "val") for p in (Path(root) / split).rglob("*.JPEG"))


def test_reencode_keeps_the_layout_and_writes_the_manifest(imagenet_dir, tmp_path):
    dst = tmp_path / "small"
    got = tools.reencode(imagenet_dir, dst, side=64, workers=2, log_every_s=0, val_side=48)
    assert got == {"files": 41, "done": 41, "skipped": 0}
    assert json.loads((dst / "reencode.json").read_text()) == {"side": 64, "val_side": 48, "quality": 90}
    assert _files(dst) == _files(imagenet_dir)
    manifest = {r["path"]: r for r in csv.DictReader(open(dst / tools.REENCODE_MANIFEST))}
    assert sorted(manifest) == _files(imagenet_dir)
    for rel, row in manifest.items():
        raw = (imagenet_dir / rel).read_bytes()
        assert int(row["size"]) == len(raw) and row["sha256"] == hashlib.sha256(raw).hexdigest()
        if rel.endswith("corrupt.JPEG"):  # copied unchanged: the pipeline skips it as before
            assert (dst / rel).read_bytes() == raw
            continue
        with Image.open(imagenet_dir / rel) as a, Image.open(dst / rel) as b:
            (w, h), (w2, h2) = a.size, b.size
            assert (int(row["width"]), int(row["height"]), int(row["out_width"]), int(row["out_height"])) == (
                w, h, w2, h2)
            assert b.format == "JPEG" and b.mode == "RGB"
            side = 64 if rel.startswith("train/") else 48
            if min(w, h) <= side:
                assert (w2, h2) == (w, h)
            else:
                assert min(w2, h2) == side and (w2, h2) == (round(w * side / min(w, h)), round(h * side / min(w, h)))
            assert abs(np.asarray(a, np.float32).mean() - np.asarray(b, np.float32).mean()) < 1.0
    data = ImageFolder(dst, workers=0, image_size=32)  # the pipeline runs unchanged on it
    for xb, yb in data.train(4, seed=0, num_epochs=1):
        assert xb.shape == (4, 32, 32, 3) and _labels_match_pixels(xb, yb)


def test_reencode_resumes_skips_done_and_redoes_changed(imagenet_dir, tmp_path):
    dst = tmp_path / "small"
    tools.reencode(imagenet_dir, dst, side=64, workers=1)
    manifest = dst / tools.REENCODE_MANIFEST
    lines = manifest.read_text().splitlines(keepends=True)
    # Killed: the last 3 rows never written, the one before half written.
    manifest.write_text("".join(lines[:-4]) + lines[-4][:20])
    lost = {line.split(",")[0] for line in lines[-4:]}
    kept = [line.split(",")[0] for line in lines[1:-4]]
    changed, touched, deleted = kept[0], kept[1], kept[2]
    with Image.open(imagenet_dir / changed) as im:
        Image.fromarray(255 - np.asarray(im)).save(imagenet_dir / changed)  # new content, new size
    os.utime(imagenet_dir / touched, ns=(1, 1))  # new mtime, same bytes
    (dst / deleted).unlink()
    before = {rel: (dst / rel).stat().st_mtime_ns for rel in kept[3:]}
    got = tools.reencode(imagenet_dir, dst, side=64, workers=1)
    assert got == {"files": 41, "done": len(lost) + 2, "skipped": 41 - len(lost) - 2}
    assert {rel: (dst / rel).stat().st_mtime_ns for rel in kept[3:]} == before  # not rewritten
    rows = {r["path"]: r for r in csv.DictReader(open(manifest))}
    assert sorted(rows) == _files(imagenet_dir)
    assert rows[changed]["sha256"] == hashlib.sha256((imagenet_dir / changed).read_bytes()).hexdigest()
    with Image.open(imagenet_dir / changed) as a, Image.open(dst / changed) as b:
        assert abs(np.asarray(a.resize(b.size), np.float32).mean() - np.asarray(b, np.float32).mean()) < 1.0
    assert rows[touched]["mtime_ns"] == str((imagenet_dir / touched).stat().st_mtime_ns)  # hashed once, not again
    assert tools.reencode(imagenet_dir, dst, side=64, workers=1)["done"] == 0
    with pytest.raises(ConfigError, match="made with"):
        tools.reencode(imagenet_dir, dst, side=96, workers=1)


@pytest.mark.slow  # a subprocess and its compiles
def test_reencode_command_line(imagenet_dir, tmp_path):
    import subprocess
    import sys

    def cli(*argv):
        return subprocess.run([sys.executable, str(REPO / "tools.py"), "reencode", *map(str, argv)],
                              capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))

    p = cli(imagenet_dir, tmp_path / "small", "--side", "64", "--workers", "1")
    assert p.returncode == 0, p.stderr
    assert "41 files written, 0 already done" in p.stdout and _files(tmp_path / "small") == _files(imagenet_dir)
    p = cli(imagenet_dir, tmp_path / "small", "--side", "16")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--side 16" in p.stderr
