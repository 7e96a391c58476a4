import os, subprocess, sys, textwrap

import numpy as np
import pytest

from boneage.gradcam import (feature_layer, gradcam, heat_maps, localisation_score, localisation_table, maps_and_gradients,
                             mean_localisation, phantom_masks, split_at, upsample)
from boneage.model import build_model
from boneage.preprocess import load_radiograph, xception_scale


def test_score_of_the_mask_itself_is_maximal():
    rng = np.random.default_rng(0)
    hand = np.zeros((64, 64), bool); hand[5:60, 10:54] = True
    age = np.zeros_like(hand); age[40:50, 20:40] = True; age[10:14, 15:20] = True
    best = localisation_score(age.astype(float), age, hand)
    assert best == pytest.approx(hand.sum() / age.sum())
    for _ in range(50):  # no heat map inside the hand scores higher
        assert localisation_score(rng.random((64, 64)) ** 3, age, hand) <= best + 1e-9
    assert localisation_score(np.ones((64, 64)), age, hand) == pytest.approx(1.0)
    assert np.isnan(localisation_score(np.zeros((64, 64)), age, hand))  # no heat: no score


def test_heat_maps_shape_and_range():
    m = build_model(72)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 72, 72, 3)).astype("float32")
    cams, pred = gradcam(m, x, [1, 0, 1, 0, 1], batch_size=2)  # in batches: the same maps as all at once
    all_at_once, _ = gradcam(m, x, [1, 0, 1, 0, 1], batch_size=8)
    assert cams.shape == (5, 9, 9) and cams.min() >= 0 and cams.max() <= 1 and pred.shape == (5,) and cams.dtype == np.float32
    np.testing.assert_allclose(cams, all_at_once, atol=1e-5)
    assert upsample(cams[0], 72).shape == (72, 72)


def test_no_map_is_empty_whichever_way_the_estimate_moved(trained_phantom):
    # A regression's plain Grad-CAM keeps only evidence for an older reading: images read younger than the model's
    # average get an all-zero map. Ours follows each image's direction, so every map has a peak.
    result, df, data, out = trained_phantom
    test = df[df.split == "test"].head(24)
    images = xception_scale(np.stack([load_radiograph(p, 72) for p in test.path]))
    from boneage.gradcam import split_at, gradient_of_sum
    import keras
    to_maps, from_maps = split_at(result.model)  # the last maps: the sign of an image's evidence, summed over the network's input to the head
    male = keras.ops.convert_to_tensor(test.male.to_numpy("float32").reshape(-1, 1))
    maps = to_maps({"image": keras.ops.convert_to_tensor(images), "male": male}, training=False)
    grads = gradient_of_sum(from_maps, maps, male)
    net = np.einsum("bhwc,bc->b", np.asarray(maps), grads.mean(axis=(1, 2)))
    moved = net != 0  # a tiny model's head can be dead for an image: its estimate then does not depend on the image at all
    assert (net < 0).any() and (net > 0).any(), "the test needs images moved either way"
    for method in ("gradcam", "hirescam"):
        cams, _ = gradcam(result.model, images, test.male.to_numpy(), stride=32, method=method)
        np.testing.assert_allclose(cams[moved].max(axis=(1, 2)), 1.0, atol=1e-4)
        assert (cams[~moved] == 0).all()  # nothing to explain: an empty map, not noise


def test_every_phantom_image_gets_a_localisation_score(trained_phantom):
    result, df, data, out = trained_phantom
    test = df[df.split == "test"].head(24)
    images = xception_scale(np.stack([load_radiograph(p, 72) for p in test.path]))
    age, hand = phantom_masks(data, test.id, 72)
    mean, scores = mean_localisation(result.model, images, test.male.to_numpy(), age, hand)
    maximum = [hand_.sum() / (a & hand_).sum() for a, hand_ in zip(age, hand)]
    _, grads, _ = maps_and_gradients(result.model, images, test.male.to_numpy())
    moved = np.abs(grads).sum(axis=(1, 2, 3)) > 0  # a dead head for an image: no gradient, no map, no score
    assert moved.sum() >= 3 and not np.isnan(np.array(scores)[moved]).any() and np.isnan(np.array(scores)[~moved]).all()
    assert all(np.isnan(s) or 0 <= s <= m + 1e-9 for s, m in zip(scores, maximum)) and mean == pytest.approx(np.nanmean(scores))


JAX_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, keras
    from boneage.gradcam import gradcam
    assert keras.backend.backend() == "jax"
    model = keras.saving.load_model(sys.argv[1])
    x = np.load(sys.argv[2])
    cams, pred = gradcam(model, x, [1, 0])
    np.save(sys.argv[3], cams)
""")


def test_same_heat_maps_on_jax(tmp_path):
    pytest.importorskip("jax")
    m = build_model(72)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 72, 72, 3)).astype("float32")
    m.save(tmp_path / "m.keras"); np.save(tmp_path / "x.npy", x)
    tf_cams, _ = gradcam(m, x, [1, 0])
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    r = subprocess.run([sys.executable, "-c", JAX_SCRIPT, str(tmp_path / "m.keras"), str(tmp_path / "x.npy"),
                        str(tmp_path / "cams.npy")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "cams.npy"), tf_cams, atol=2e-3)


def test_the_overlay_explains_the_image_that_was_predicted(bundle_dir, trained_phantom, tmp_path, monkeypatch):
    "With --fix-inverted the model reads the inverted-back image: the overlay shows that one, and nothing is decoded again."
    from PIL import Image
    from boneage import preprocess
    from boneage.bundle import load_bundle
    from boneage.gradcam import explain
    from boneage.inference import Predictor
    _, df, _, _ = trained_phantom
    bundle = load_bundle(bundle_dir)
    Image.fromarray(255 - np.asarray(Image.open(df.path[0]))).save(tmp_path / "negative.png")
    (r,) = Predictor(bundle, fix_inverted=True, gate=False).predict_many([(tmp_path / "negative.png", True)])
    assert any("inverted before predicting" in n for n in r.notes) and r.bone_age_months is not None
    np.testing.assert_array_equal(r.image, preprocess.load_radiograph(df.path[0], bundle.spec))  # as the original reads
    monkeypatch.setattr(preprocess, "load_radiograph", lambda *a, **k: pytest.fail("the radiograph was read a second time"))
    made = explain(bundle, r.image, r.male, tmp_path / "cam.png", "negative.png")
    assert made.stat().st_size > 5_000


@pytest.mark.parametrize("backbone,size,sides", [("Xception", 96, {32: 3, 16: 6, 8: 12}), ("EfficientNetB0", 96, {32: 3, 16: 6, 8: 12})])
def test_each_stride_finds_a_layer_that_splits_the_network(backbone, size, sides):
    import keras
    m = build_model(size, backbone)
    x = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype("float32")
    whole = np.asarray(m({"image": x, "male": np.array([[1.0], [0.0]], "float32")}, training=False))[:, 0]
    for stride, side in sides.items():
        maps, grads, pred = maps_and_gradients(m, x, [1, 0], stride=stride)
        assert maps.shape[1:3] == (side, side) and grads.shape == maps.shape
        np.testing.assert_allclose(pred, whole, rtol=1e-4, atol=1e-3)  # the two halves make the whole network
    with pytest.raises(ValueError, match="skip connection"):
        split_at(build_model(72), "block12_sepconv3_act")


def test_hirescam_is_gradcam_at_the_last_layer_of_an_average_pooled_network_and_finer_before():
    x = np.random.default_rng(1).uniform(-1, 1, (3, 72, 72, 3)).astype("float32")
    m = build_model(72, pooling="avg")
    maps, grads, _ = maps_and_gradients(m, x, [1, 0, 1], stride=32)
    np.testing.assert_allclose(heat_maps(maps, grads, "hirescam"), heat_maps(maps, grads, "gradcam"), atol=1e-4)
    maps, grads, _ = maps_and_gradients(m, x, [1, 0, 1], stride=8)
    assert not np.allclose(heat_maps(maps, grads, "hirescam"), heat_maps(maps, grads, "gradcam"), atol=1e-3)
    with pytest.raises(ValueError, match="method 'cam'"):
        heat_maps(maps, grads, "cam")


def test_localisation_table_scores_every_setting(trained_phantom):
    result, df, data, out = trained_phantom
    test = df[df.split == "test"].head(8)
    images = xception_scale(np.stack([load_radiograph(p, 72) for p in test.path]))
    age, hand = phantom_masks(data, test.id, 72)
    rows = localisation_table({"trained": result.model}, images, test.male.to_numpy(), age, hand, strides=(32, 8))
    assert [(r["stride"], r["method"], r["map"]) for r in rows] == [(s, m, v) for s in (32, 8) for m in ("hirescam", "gradcam")
                                                                    for v in ("signed", "standard")]
    signed = [r for r in rows if r["stride"] == 8 and r["method"] == "hirescam" and r["map"] == "signed"][0]
    assert signed["trained"] == pytest.approx(mean_localisation(result.model, images, test.male.to_numpy(), age, hand)[0], abs=1e-3)
