"""Tests of allcnn_lib.data: finding, reading, checking and splitting CIFAR-10."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from allcnn_lib import data as D
from allcnn_lib.data import CIFAR10Error, load_cifar10

# --------------------------------------------------------------------------- helpers


def fake_batch(n: int, seed: int, label_offset: int = 0) -> tuple[np.ndarray, list[int]]:
    """Rows in the official channel-first layout, with balanced labels."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [(i + label_offset) % 10 for i in range(n)]
    return rows, labels


def write_batch(path: Path, rows: np.ndarray, labels, *, keys_as_bytes: bool = True) -> None:
    batch = {"data": rows, "labels": labels, "batch_label": "fake", "filenames": []}
    if keys_as_bytes:
        batch = {k.encode(): v for k, v in batch.items()}
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)


def make_batches_dir(root: Path, n: int = 20) -> Path:
    """A tiny but complete cifar-10-batches-py folder under ``root``."""
    folder = root / D.BATCHES_DIR
    folder.mkdir(parents=True)
    for i, name in enumerate(D.TRAIN_BATCHES):
        write_batch(folder / name, *fake_batch(n, seed=i))
    write_batch(folder / D.TEST_BATCH, *fake_batch(n, seed=99))
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [c.encode() for c in D.CLASS_NAMES]}, fh)
    return folder


def make_archive(root: Path, n: int = 20) -> Path:
    folder = make_batches_dir(root / "src", n)
    archive = root / D.ARCHIVE_NAME
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=D.BATCHES_DIR)
    return archive


def no_network(directory: Path) -> Path:
    raise OSError("[Errno -3] Temporary failure in name resolution")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.delenv("ALLCNN_QUICK", raising=False)


@pytest.fixture
def empty_data_dir(tmp_path, monkeypatch) -> Path:
    """data/ holding only the shipped sample (a fresh clone), offline (downloads fail)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / D.SAMPLE_NAME).write_bytes((D.DEFAULT_DATA_DIR / D.SAMPLE_NAME).read_bytes())
    monkeypatch.setattr(D, "DEFAULT_DATA_DIR", folder)
    monkeypatch.setattr(D, "_fetch", no_network)
    return folder


# --------------------------------------------------------------------------- pixels


def test_rows_to_images_channel_first_to_last_on_hand_made_file(tmp_path):
    """One hand-made image: red ramp, green constant, blue marks pixel (row 2, col 5)."""
    red = np.arange(1024, dtype=np.uint16).reshape(32, 32) % 256
    green = np.full((32, 32), 7)
    blue = np.zeros((32, 32))
    blue[2, 5] = 200
    row = np.concatenate([red.ravel(), green.ravel(), blue.ravel()]).astype(np.uint8)
    folder = tmp_path / D.BATCHES_DIR
    folder.mkdir()
    for name in (*D.TRAIN_BATCHES, D.TEST_BATCH):
        write_batch(folder / name, np.tile(row, (10, 1)), list(range(10)))
    x_train, _, x_test, _ = D.read_full_set(folder)
    image = x_test[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], red)
    assert (image[..., 1] == 7).all()
    assert image[2, 5, 2] == 200 and image[..., 2].sum() == 200
    # The original repository's bug: reshaping the rows straight to (32, 32, 3) interleaves the
    # planes.
    scrambled = row.reshape(32, 32, 3)
    assert not np.array_equal(scrambled, image)
    np.testing.assert_array_equal(x_train[0], image)


def test_rows_to_images_rejects_wrong_width():
    with pytest.raises(ValueError, match="3072"):
        D.rows_to_images(np.zeros((2, 3000), np.uint8))


# --------------------------------------------------------------------------- sources


def test_reads_batches_dir_passed_as_path(tmp_path):
    folder = make_batches_dir(tmp_path)
    d = load_cifar10(folder, validation_size=10)
    assert d.x_train.shape == (90, 32, 32, 3) and d.x_val.shape == (10, 32, 32, 3)
    assert d.x_test.shape == (20, 32, 32, 3)
    assert d.y_train.dtype == np.int64 and d.x_train.dtype == np.uint8
    assert d.class_names == D.CLASS_NAMES and not d.is_sample
    # the parent folder works too
    assert load_cifar10(tmp_path, validation_size=10).source == str(folder)


def trust(archive: Path, monkeypatch) -> Path:
    """Make a hand-made archive pass for the official one (its md5 is checked on reading)."""
    monkeypatch.setattr(D, "CIFAR10_MD5", D.md5sum(archive))
    return archive


def test_reads_archive_without_unpacking(tmp_path, monkeypatch):
    archive = trust(make_archive(tmp_path), monkeypatch)
    from_tar = load_cifar10(archive, validation_size=10)
    from_dir = load_cifar10(tmp_path / "src", validation_size=10)
    np.testing.assert_array_equal(from_tar.x_train, from_dir.x_train)
    np.testing.assert_array_equal(from_tar.y_test, from_dir.y_test)


def test_search_order_env_then_data_dir(tmp_path, monkeypatch, empty_data_dir):
    env_root = tmp_path / "env"
    make_batches_dir(env_root, n=10)
    make_batches_dir(empty_data_dir, n=20)
    monkeypatch.setenv("CIFAR10_DIR", str(env_root))
    assert len(load_cifar10(validation_size=0).y_test) == 10
    monkeypatch.delenv("CIFAR10_DIR")
    assert len(load_cifar10(validation_size=0).y_test) == 20
    # an explicit path beats both
    explicit = make_batches_dir(tmp_path / "explicit", n=30)
    assert len(load_cifar10(explicit, validation_size=0).y_test) == 30


def test_data_dir_archive_used_when_no_folder(tmp_path, empty_data_dir, monkeypatch):
    archive = trust(make_archive(tmp_path), monkeypatch)
    archive.rename(empty_data_dir / D.ARCHIVE_NAME)
    d = load_cifar10(validation_size=10)
    assert d.source.endswith(D.ARCHIVE_NAME) and len(d.y_test) == 20


def test_download_is_atomic_and_md5_checked(tmp_path, empty_data_dir, monkeypatch):
    archive = make_archive(tmp_path)
    monkeypatch.setattr(D, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())

    def fake_download(directory: Path) -> Path:
        target = directory / D.ARCHIVE_NAME
        target.write_bytes(archive.read_bytes())
        return target

    monkeypatch.setattr(D, "_fetch", fake_download)
    d = load_cifar10(validation_size=10)
    assert d.source == str(empty_data_dir / D.ARCHIVE_NAME)
    assert sorted(p.name for p in empty_data_dir.iterdir()) == [D.ARCHIVE_NAME, D.SAMPLE_NAME]


def corrupt_download(directory: Path) -> Path:
    (directory / D.ARCHIVE_NAME).write_bytes(b"not the archive")
    return directory / D.ARCHIVE_NAME


def interrupted(directory: Path) -> Path:
    (directory / D.ARCHIVE_NAME).write_bytes(b"half")
    raise ConnectionResetError("connection reset by peer")


@pytest.mark.parametrize("fetch, why", [
    (no_network, "download failed (OSError: [Errno -3] Temporary failure"),
    (interrupted, "download failed (ConnectionResetError: connection reset by peer)"),
    (corrupt_download, "md5 is faad6fe8d15940921af14a21e4af226d, expected c58f30108f718f9"),
])
def test_failed_download_leaves_nothing_and_falls_back_to_sample(
        empty_data_dir, monkeypatch, capsys, fetch, why):
    monkeypatch.setattr(D, "_fetch", fetch)
    d = load_cifar10()
    assert [p.name for p in empty_data_dir.iterdir()] == [D.SAMPLE_NAME]  # no half download
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Notice:") and "sample" in err[0]
    assert why in err[0] and "CIFAR10_DIR" in err[0]
    assert err[0].lower().count("full set") == 1  # it said so twice
    assert d.is_sample and len(d.y_train) + len(d.y_val) == 2000 and len(d.y_test) == 1000


# --------------------------------------------------------------------------- bad input


def test_missing_explicit_folder(tmp_path):
    with pytest.raises(CIFAR10Error, match=r"does not exist.*Fix:"):
        load_cifar10(tmp_path / "nowhere")


def test_env_pointing_at_empty_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))
    with pytest.raises(CIFAR10Error, match=r"\$CIFAR10_DIR.*holds no CIFAR-10 data"):
        load_cifar10()


def _halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, problem", [
    (lambda f: (f / "data_batch_3").unlink(), r"missing data_batch_3.*Fix:"),
    (lambda f: _halve(f / "data_batch_2"), r"data_batch_2: not a readable CIFAR-10 batch"),
    (lambda f: (f / D.TEST_BATCH).write_bytes(b"\x00garbage" * 100), r"test_batch: not a readable"),
    (lambda f: (f / "data_batch_4").write_bytes(pickle.dumps({b"images": []})),
     r"data_batch_4: not a readable CIFAR-10 batch \(KeyError: 'data'\)"),
    (lambda f: write_batch(f / "data_batch_1", np.zeros((10, 3000), np.uint8), list(range(10))),
     r"'data' has shape \(10, 3000\)"),
    (lambda f: write_batch(f / "data_batch_1", np.zeros((10, 3072), np.float32),
                           list(range(10))), "dtype float32"),
    (lambda f: write_batch(f / "data_batch_1", np.zeros((10, 3072), np.uint8), list(range(9))),
     r"'labels' has shape \(9,\)"),
    (lambda f: write_batch(f / "data_batch_1", np.zeros((10, 3072), np.uint8), [12] * 10),
     r"labels outside 0..9"),
])
def test_damaged_batches_folder_is_one_clear_error(tmp_path, damage, problem):
    folder = make_batches_dir(tmp_path)
    damage(folder)
    with pytest.raises(CIFAR10Error, match=problem):
        load_cifar10(folder)


def test_corrupt_archive(tmp_path):
    archive = make_archive(tmp_path)
    _halve(archive)
    with pytest.raises(CIFAR10Error, match=r"cifar-10-python.tar.gz.*Fix: delete"):
        load_cifar10(archive)


def test_archive_missing_member(tmp_path):
    folder = make_batches_dir(tmp_path / "src")
    archive = tmp_path / D.ARCHIVE_NAME
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "data_batch_1", arcname=f"{D.BATCHES_DIR}/data_batch_1")
    with pytest.raises(CIFAR10Error, match="the archive lacks data_batch_2"):
        load_cifar10(archive)


def test_corrupt_sample_is_caught_by_md5(empty_data_dir):
    path = empty_data_dir / D.SAMPLE_NAME
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CIFAR10Error, match=r"md5 is .*git checkout data/cifar10_sample.npz"):
        load_cifar10(sample=True)


def test_missing_sample(empty_data_dir):
    (empty_data_dir / D.SAMPLE_NAME).unlink()
    with pytest.raises(CIFAR10Error, match="shipped sample is missing"):
        load_cifar10()


def test_no_data_notice_comes_fast_alone_and_without_tensorflow(empty_data_dir):
    """Issue 20, item 13: offline with nothing on disk, the notice is the only line on stderr,
    said once, within a second or two: no TensorFlow start-up (and its C++ lines) for a
    download attempt."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from allcnn_lib import data\n"
        "data.CIFAR10_URL = 'http://127.0.0.1:9/cifar-10-python.tar.gz'  # refused at once\n"
        f"data.DEFAULT_DATA_DIR = Path({str(empty_data_dir)!r})\n"
        "start = time.perf_counter()\n"
        "d = data.load_cifar10()\n"
        "print(d.is_sample, 'tensorflow' in sys.modules, 'keras' in sys.modules,\n"
        "      round(time.perf_counter() - start, 1))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("ALLCNN_QUICK", "CIFAR10_DIR")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sample, tensorflow, keras, seconds = proc.stdout.split()
    assert (sample, tensorflow, keras) == ("True", "False", "False")
    assert float(seconds) < 10
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Notice: ") and "sample" in lines[0]
    assert lines[0].lower().count("full set") == 1


def test_data_source_is_recorded_relative_to_the_repository(cifar_sample):
    """Issue 20, item 16: what runs, benchmarks and notebooks print and record."""
    assert cifar_sample.source == "data/cifar10_sample.npz"
    assert D.portable_path(D.DEFAULT_DATA_DIR / "x") == "data/x"
    assert D.portable_path(Path.home() / ".cache" / "y") == "~/.cache/y"


# --------------------------------------------------------------------------- verification


def digests_of(folder: Path) -> dict[str, str]:
    return {name: D.batch_digest(*D.parse_batch((folder / name).read_bytes(), name, ""))
            for name in (*D.TRAIN_BATCHES, D.TEST_BATCH)}


@pytest.fixture
def known_copy(tmp_path, monkeypatch) -> Path:
    """A tiny batches folder registered as a known copy (as the JPEG copy is)."""
    folder = make_batches_dir(tmp_path / "copy")
    monkeypatch.setattr(D, "KNOWN_COPIES", {"tiny copy": digests_of(folder)})
    return folder


def test_archive_with_the_official_name_must_be_the_official_one(tmp_path, monkeypatch):
    """Issue 20, item 8: a cifar-10-python.tar.gz that is neither the official archive nor a
    known copy (a flipped byte, an edited batch) is refused, not trained on."""
    archive = make_archive(tmp_path)
    with pytest.raises(CIFAR10Error, match=r"md5 is \w+, not the official archive's "
                                           r"c58f3010.*match no known copy.*verify-data"):
        load_cifar10(archive)
    # a known copy repacked under the official name (../shared/cifar10/unpack.py --tar) loads
    monkeypatch.setattr(D, "KNOWN_COPIES", {"repack": digests_of(tmp_path / "src" /
                                                                 D.BATCHES_DIR)})
    assert len(load_cifar10(archive, validation_size=10).y_test) == 20


def test_verify_data_accepts_a_known_copy(known_copy):
    report = D.verify_data(known_copy)
    assert report.problems == []
    assert {row[3] for row in report.batches} == {"tiny copy"}
    text = "\n".join(report.lines())
    assert "data_batch_1" in text and "test: 20 images, per class 2 to 2" in text


def test_verify_data_finds_a_flipped_byte_in_one_batch(known_copy):
    raw = bytearray((known_copy / "data_batch_2").read_bytes())
    raw[len(raw) // 2] ^= 0x01  # a pixel: the file still loads
    (known_copy / "data_batch_2").write_bytes(bytes(raw))
    assert len(load_cifar10(known_copy, validation_size=10).y_train) == 90
    report = D.verify_data(known_copy)
    assert len(report.problems) == 1
    assert "data_batch_2: its contents differ from tiny copy" in report.problems[0]


def test_verify_data_finds_labels_out_of_balance(tmp_path):
    folder = make_batches_dir(tmp_path)
    write_batch(folder / D.TEST_BATCH, fake_batch(20, seed=99)[0], [0] * 20)
    report = D.verify_data(folder)
    assert any("test images per class are 20, 0, 0" in p for p in report.problems)
    assert any("neither the official release nor a copy" in n for n in report.notes)


def test_verify_data_without_data_is_a_clear_error(empty_data_dir):
    with pytest.raises(CIFAR10Error, match="no CIFAR-10 here"):
        D.verify_data()


def test_verify_data_on_the_full_set(full_cifar10_dir):
    report = D.verify_data(full_cifar10_dir)
    assert report.problems == []
    assert len(matches := {row[3] for row in report.batches}) == 1 and None not in matches


# --------------------------------------------------------------------------- splits


def test_sample_is_real_balanced_and_deterministic(cifar_sample):
    d = cifar_sample
    assert d.is_sample
    assert np.bincount(d.y_test).tolist() == [100] * 10
    assert np.bincount(d.y_val).tolist() == [20] * 10
    assert np.bincount(d.y_train).tolist() == [180] * 10
    # real photographs, not noise: neighbouring pixels are strongly correlated
    x = d.x_test.astype(np.float32)
    corr = np.corrcoef(x[:, :, :-1].ravel(), x[:, :, 1:].ravel())[0, 1]
    assert corr > 0.8
    again = load_cifar10(sample=True)
    np.testing.assert_array_equal(again.x_train, d.x_train)
    np.testing.assert_array_equal(again.y_val, d.y_val)


def test_quick_mode_forces_sample(monkeypatch, tmp_path):
    monkeypatch.setenv("ALLCNN_QUICK", "1")
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "ignored"))
    assert load_cifar10().is_sample


def test_validation_split_is_disjoint_seeded_and_balanced():
    y = np.repeat(np.arange(10), 50)
    train, val = D.train_validation_split(y, 100, seed=3)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 500
    assert np.bincount(y[val]).tolist() == [10] * 10
    t2, v2 = D.train_validation_split(y, 100, seed=3)
    np.testing.assert_array_equal(val, v2)
    _, v3 = D.train_validation_split(y, 100, seed=4)
    assert not np.array_equal(np.sort(val), np.sort(v3))


def test_limit_gives_balanced_subset(cifar_sample):
    d = load_cifar10(sample=True, limit=300, test_limit=100, validation_size=50)
    assert len(d.y_train) == 250 and len(d.y_val) == 50 and len(d.y_test) == 100
    assert np.bincount(d.y_train + 0, minlength=10).tolist() == [25] * 10
    assert np.bincount(d.y_test).tolist() == [10] * 10


def test_bad_subset_sizes():
    y = np.repeat(np.arange(10), 5)
    with pytest.raises(ValueError, match="multiple of 10"):
        D.balanced_subset(y, 15)
    with pytest.raises(ValueError, match="fewer than 6"):
        D.balanced_subset(y, 60)
    with pytest.raises(ValueError, match="validation_size"):
        D.train_validation_split(y, 50)


def test_full_set_split(full_cifar10_dir):
    """On the unpacked CIFAR-10 (JPEG copy): 45,000 / 5,000 / 10,000, balanced test set."""
    d = load_cifar10(full_cifar10_dir)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (45_000, 5_000, 10_000)
    assert np.bincount(d.y_test).tolist() == [1000] * 10
    assert np.bincount(d.y_val).tolist() == [500] * 10
    assert d.x_train.shape[1:] == (32, 32, 3) and d.x_train.dtype == np.uint8
