import os, subprocess, sys, textwrap

import numpy as np
import pytest

from boneage.gradcam import feature_layer, gradcam, localisation_score, mean_localisation, phantom_masks, upsample
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
    assert cams.shape == (5, 3, 3) and cams.min() >= 0 and cams.max() <= 1 and pred.shape == (5,) and cams.dtype == np.float32
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
    to_maps, from_maps = split_at(result.model)
    male = keras.ops.convert_to_tensor(test.male.to_numpy("float32").reshape(-1, 1))
    maps = to_maps({"image": keras.ops.convert_to_tensor(images), "male": male}, training=False)
    grads = gradient_of_sum(from_maps, maps, male)
    net = np.einsum("bhwc,bc->b", np.asarray(maps), grads.mean(axis=(1, 2)))
    assert (net < 0).any() and (net > 0).any(), "the test needs images moved either way"
    cams, _ = gradcam(result.model, images, test.male.to_numpy())
    np.testing.assert_allclose(cams.max(axis=(1, 2)), 1.0, atol=1e-4)


@pytest.mark.parametrize("backbone,layer,size", [("Xception", "block14_sepconv2_act", 72), ("EfficientNetB0", "top_activation", 64),
                                                 ("MobileNetV2", "out_relu", 64)])
def test_the_layer_is_found_for_any_backbone(backbone, layer, size):
    m = build_model(size, backbone)
    assert feature_layer(m) == layer
    cams, _ = gradcam(m, np.zeros((1, size, size, 3), "float32"), [1])
    assert cams.shape[0] == 1 and np.isfinite(cams).all()


def test_a_float16_model_still_gives_float32_maps():
    import keras
    from boneage.train import precision_policy
    with precision_policy("mixed_float16"): m = build_model(72)
    cams, _ = gradcam(m, np.random.default_rng(0).uniform(-1, 1, (2, 72, 72, 3)).astype("float32"), [1, 0])
    assert cams.dtype == np.float32 and np.isfinite(cams).all() and cams.max() == pytest.approx(1, abs=1e-3)


def test_every_phantom_image_gets_a_localisation_score(trained_phantom):
    result, df, data, out = trained_phantom
    test = df[df.split == "test"].head(24)
    images = xception_scale(np.stack([load_radiograph(p, 72) for p in test.path]))
    age, hand = phantom_masks(data, test.id, 72)
    mean, scores = mean_localisation(result.model, images, test.male.to_numpy(), age, hand)
    maximum = [hand_.sum() / (a & hand_).sum() for a, hand_ in zip(age, hand)]
    assert not np.isnan(scores).any()  # an empty map would have no score
    assert all(0 <= s <= m + 1e-9 for s, m in zip(scores, maximum)) and mean == pytest.approx(np.mean(scores))


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
