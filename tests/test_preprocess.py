import os, subprocess, sys, textwrap, time

import cv2
import numpy as np
import pytest

from boneage.data import load_dataset
from boneage.phantom import hand_mask, phantom_radiograph
from boneage.preprocess import (PreprocessingError, augment, build_cache, cache_key, check_spec, hand_box, letterbox,
                                load_radiograph, prepare, preprocessing_spec, xception_scale)
from boneage.train import BoneAgeBatches


@pytest.fixture
def hand():
    img = np.zeros((300, 200), np.uint8)
    cv2.ellipse(img, (100, 150), (60, 120), 0, 0, 360, 200, -1)
    return img


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


def test_augment_darkens_black_to_black():
    "A darker exposure clips at 0: black film stays black (an absolute value would turn -20 into a grey 20)."
    class Draws:  # the draws augment asks for, in order: angle, zoom, shift (x, y), gain, brightness
        values = iter([0.0, 1.0, np.zeros(2), 1.0, -0.08])
        def uniform(self, low, high, size=None): return next(self.values)
    film = np.zeros((32, 32), np.uint8); film[8:16] = 100
    out = augment(film, Draws())
    assert out[0].max() == 0 and out[10, 10] == 100 - round(0.08 * 255)


def test_the_record_names_every_step_and_refuses_unknown_ones():
    spec = preprocessing_spec(96, crop=True, clahe=True)
    assert spec["crop"] == {"method": "otsu-largest-region", "margin": 0.05} and spec["clahe"]["clip_limit"] == 2.0
    assert spec["deep_window_percentiles"] == [0.5, 99.5] and check_spec(spec) is spec
    for bad, says in (({**spec, "padding_value": 255}, "padding_value=255"), ({**spec, "sharpen": 1}, "['sharpen'] are unknown"),
                      ({**spec, "crop": {"method": "unet"}}, "crop method 'unet'")):
        with pytest.raises(PreprocessingError, match=says.replace("[", r"\[").replace("]", r"\]")):
            check_spec(bad)


def test_crop_finds_the_hand_on_phantoms():
    for i, age in enumerate((12, 60, 120, 200)):
        img, mask = phantom_radiograph(age, i % 2 == 0, 256, seed=40 + i)
        t, b, l, r = hand_box(img, margin=0)
        hand = hand_mask(mask)
        assert hand[t:b, l:r].sum() / hand.sum() > 0.995  # all of the hand kept
        ys, xs = np.nonzero(hand)
        assert (b - t) * (r - l) < 1.15 * (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # and little else


def test_prepare_follows_the_record(hand):
    radiograph = np.zeros((600, 500), np.uint8)
    radiograph[150:406, 100:356] = phantom_radiograph(120, True, 256, seed=1)[0]  # a hand small on a large film
    plain, cropped = prepare(radiograph, preprocessing_spec(64)), prepare(radiograph, preprocessing_spec(64, crop=True))
    assert plain.shape == cropped.shape == (64, 64)
    assert (cropped > 40).sum() > 1.2 * (plain > 40).sum()  # the hand fills more of the square
    eq = prepare(hand, preprocessing_spec(64, clahe=True))
    assert not np.array_equal(eq, plain) and eq.dtype == np.uint8


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
    assert not list((tmp_path / "cache").glob("*partial*"))  # no half-written files left
    cropped, _ = build_cache(paths, preprocessing_spec(32, crop=True), tmp_path / "cache", progress=False)
    assert not np.array_equal(cropped, other)  # another record: another cache


def test_cache_key_follows_the_code(tmp_path, monkeypatch):
    from boneage import preprocess
    paths = _images(tmp_path / "img", 2)
    before = cache_key(paths, 32)
    monkeypatch.setattr(preprocess, "code_fingerprint", lambda *modules: "edited")
    assert cache_key(paths, 32) != before  # prepared by other code: not reused


def test_interrupted_build_leaves_nothing_behind(tmp_path):
    paths = _images(tmp_path / "img", 3)
    stem = tmp_path / "cache" / f"radiographs-32-{cache_key(paths, 32)}"
    stem.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    abandoned = stem.parent / f"{stem.name}.partial-{dead}.npy"
    abandoned.write_bytes(b"half a cache")  # what a killed build leaves
    build_cache(paths, 32, tmp_path / "cache", progress=False)
    assert not abandoned.exists() and len(list(stem.parent.glob("*.npy"))) == 1


def test_cache_reports_bad_images_and_carries_on(tmp_path, capsys):
    paths = _images(tmp_path / "img", 3)
    paths[1].write_bytes(b"garbage")
    cache, failed = build_cache(paths, 32, tmp_path / "cache", progress=False)
    assert list(failed) == ["1"] and "1.png: not a PNG, JPEG, TIFF or DICOM image" in failed["1"]
    assert cache[1].max() == 0 and cache[0].max() > 0 and cache[2].max() > 0
    assert "1.png: not a PNG, JPEG, TIFF or DICOM image" in capsys.readouterr().out
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
    cropped, _ = build_cache(df.path, preprocessing_spec(128, crop=True), tmp_path, progress=False)
    assert cropped[:, :, 20:108].mean() > cache[:, :, 20:108].mean()  # cropped: more hand in the middle

