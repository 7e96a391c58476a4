import os, subprocess, sys, textwrap, time

import cv2
import numpy as np
import pytest

from boneage.data import load_dataset
from boneage.preprocess import (ImageError, augment, build_cache, letterbox, load_radiograph,
                                read_radiograph, to_uint8_gray, xception_scale)
from boneage.train import BoneAgeBatches


@pytest.fixture
def hand():
    img = np.zeros((300, 200), np.uint8)
    cv2.ellipse(img, (100, 150), (60, 120), 0, 0, 360, 200, -1)
    return img


def test_8bit_png_roundtrip(tmp_path, hand):
    cv2.imwrite(str(tmp_path / "a.png"), hand)
    assert np.array_equal(read_radiograph(tmp_path / "a.png"), hand)


def test_16bit_uses_its_own_range(tmp_path, hand):
    img16 = (hand.astype(np.uint16) * 4095 // 200)  # a 12-bit detector in a 16-bit file
    cv2.imwrite(str(tmp_path / "a.png"), img16)
    out = read_radiograph(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0


def test_rgb_and_rgba(tmp_path, hand):
    rgb = np.dstack([hand] * 3)
    cv2.imwrite(str(tmp_path / "rgb.jpg"), rgb, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert np.abs(read_radiograph(tmp_path / "rgb.jpg").astype(int) - hand).max() < 8
    rgba = np.dstack([hand] * 3 + [np.full_like(hand, 255)])
    rgba[:150, :, 3] = 0  # transparent top half reads as black background
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    out = read_radiograph(tmp_path / "rgba.png")
    assert out[:150].max() == 0 and np.array_equal(out[150:], hand[150:])
    assert to_uint8_gray(np.zeros((4, 4), np.uint16)).max() == 0  # a blank 16-bit image does not divide by zero


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b"not an image", "not a decodable"),
                                            (None, "file not found")])
def test_bad_files_name_the_file(tmp_path, content, reason):
    p = tmp_path / "x.png"
    if content is not None: p.write_bytes(content)
    with pytest.raises(ImageError, match=f"x.png: {reason}"):
        read_radiograph(p)


def test_truncated_png(tmp_path, hand):
    cv2.imwrite(str(tmp_path / "t.png"), hand)
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="t.png"):
        read_radiograph(tmp_path / "t.png")


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (64, 64), (10, 500)])
def test_letterbox_keeps_aspect(shape):
    img = np.full(shape, 255, np.uint8)
    out = letterbox(img, 64)
    assert out.shape == (64, 64)
    ys, xs = np.nonzero(out > 127)
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    assert abs(h / w - shape[0] / shape[1]) < 0.1 * max(1, shape[0] / shape[1])
    assert max(h, w) == 64  # the long side fills the square
    assert abs((ys.min() + ys.max()) / 2 - 31.5) <= 1 and abs((xs.min() + xs.max()) / 2 - 31.5) <= 1  # centred


def test_xception_scaling_matches_keras():
    from keras.applications import xception
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = xception_scale(img)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32 and x.min() == -1 and x.max() == 1
    ref = xception.preprocess_input(np.repeat(img[..., None].astype(np.float32), 3, -1))
    np.testing.assert_allclose(x, ref, atol=1e-6)


def test_augment_is_seeded_and_small(hand):
    sq = letterbox(hand, 128)
    a = augment(sq, np.random.default_rng(1)); b = augment(sq, np.random.default_rng(1))
    assert np.array_equal(a, b) and a.shape == sq.shape and a.dtype == np.uint8
    assert not np.array_equal(a, sq)
    assert abs(int((a > 100).sum()) - int((sq > 100).sum())) < 0.35 * (sq > 100).sum()  # the hand stays a hand
    assert augment(sq, np.random.default_rng(1), clahe=True).shape == sq.shape


def _images(folder, n, size=(120, 90)):
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        img = np.zeros(size, np.uint8); cv2.circle(img, (45, 60), 10 + i, 255, -1)
        cv2.imwrite(str(folder / f"{i}.png"), img); paths.append(folder / f"{i}.png")
    return paths


def test_cache_build_reuse_and_rebuild(tmp_path):
    paths = _images(tmp_path / "img", 5)
    cache, failed = build_cache(paths, 64, tmp_path / "cache", progress=False)
    assert cache.shape == (5, 64, 64) and cache.dtype == np.uint8 and failed == {}
    assert isinstance(cache, np.memmap)
    assert np.array_equal(cache[3], load_radiograph(paths[3], 64))
    files = sorted((tmp_path / "cache").iterdir())
    again, _ = build_cache(paths, 64, tmp_path / "cache", progress=False)
    assert sorted((tmp_path / "cache").iterdir()) == files  # reused: no new file
    time.sleep(0.01)
    img = np.full((120, 90), 77, np.uint8); cv2.imwrite(str(paths[0]), img)  # a source changes
    changed, _ = build_cache(paths, 64, tmp_path / "cache", progress=False)
    assert changed[0].max() == 77 and len(list((tmp_path / "cache").glob("*.npy"))) == 2
    other, _ = build_cache(paths, 32, tmp_path / "cache", progress=False)  # another size: another cache
    assert other.shape == (5, 32, 32)
    assert not list((tmp_path / "cache").glob("tmp*"))  # no half-written files left


def test_cache_reports_bad_images_and_carries_on(tmp_path, capsys):
    paths = _images(tmp_path / "img", 3)
    paths[1].write_bytes(b"garbage")
    cache, failed = build_cache(paths, 32, tmp_path / "cache", progress=False)
    assert list(failed) == ["1"] and "1.png: not a decodable" in failed["1"]
    assert cache[1].max() == 0 and cache[0].max() > 0 and cache[2].max() > 0
    assert "1.png: not a decodable" in capsys.readouterr().out
    _, failed_again = build_cache(paths, 32, tmp_path / "cache", progress=False)
    assert failed_again == failed  # remembered with the cache


def test_batches_shapes_order_and_augmentation(tmp_path):
    cache = np.random.default_rng(0).integers(0, 255, (10, 32, 32), dtype=np.uint8)
    male, age = np.arange(10) % 2 == 0, np.arange(10) * 12.0
    idx = np.array([0, 2, 3, 5, 7, 9, 1])
    b = BoneAgeBatches(cache, male, age, idx, batch_size=3, shuffle=True, augment=True, seed=4)
    assert len(b) == 3
    x, y = b[0]
    assert x["image"].shape == (3, 32, 32, 3) and x["male"].shape == (3, 1) and y.shape == (3,)
    assert x["image"].dtype == np.float32 and -1 <= x["image"].min() and x["image"].max() <= 1
    seen = np.concatenate([b[i][1] for i in range(len(b))])
    assert sorted(seen) == sorted(age[idx])  # every training image once per epoch, no other image
    np.testing.assert_array_equal(b[1][0]["image"], b[1][0]["image"])  # a batch does not depend on when it is made
    first = [b[i][1].tolist() for i in range(len(b))]
    b.on_epoch_end()
    assert [b[i][1].tolist() for i in range(len(b))] != first  # reshuffled each epoch
    plain = BoneAgeBatches(cache, male, age, batch_size=4)
    x0, y0 = plain[0]
    np.testing.assert_allclose(x0["image"], xception_scale(cache[:4]))
    assert x0["male"][:, 0].tolist() == [1, 0, 1, 0] and y0.tolist() == [0, 12, 24, 36]


BACKEND_SCRIPT = textwrap.dedent("""
    import numpy as np, keras
    from boneage.train import BoneAgeBatches
    assert keras.backend.backend() == "{backend}"
    cache = np.random.default_rng(0).integers(0, 255, (8, 32, 32), dtype=np.uint8)
    data = BoneAgeBatches(cache, np.arange(8) % 2, np.arange(8) * 10.0, batch_size=4, shuffle=True, augment=True)
    image, male = keras.Input((32, 32, 3), name="image"), keras.Input((1,), name="male")
    x = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(image), male])
    model = keras.Model({{"image": image, "male": male}}, keras.layers.Dense(1)(x))
    model.compile("adam", "mse")
    hist = model.fit(data, epochs=2, verbose=0)
    print("ok", len(hist.history["loss"]))
""")


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_batches_feed_keras_on_each_backend(backend):
    pytest.importorskip(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT.format(backend=backend)], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "ok 2" in r.stdout, r.stderr[-2000:]


def test_cache_on_real_radiographs(rsna_sample, tmp_path):
    df = load_dataset(rsna_sample, strict=True)
    cache, failed = build_cache(df.path, 128, tmp_path, progress=False)
    assert failed == {} and cache.shape == (40, 128, 128)
    # 1600x2080 portrait radiographs: letterboxing leaves black bars left and right, the hand in the middle
    assert cache[:, :, :5].max() == 0 and cache[:, :, 60:68].mean() > 20
