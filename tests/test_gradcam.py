import json, os, subprocess, sys, textwrap

import numpy as np
import pytest

from boneage.gradcam import gradcam, localisation_score, mean_localisation, phantom_masks, upsample
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
    x = np.random.default_rng(0).uniform(-1, 1, (3, 72, 72, 3)).astype("float32")
    cams, pred = gradcam(m, x, [1, 0, 1])
    assert cams.shape == (3, 3, 3) and cams.min() >= 0 and cams.max() <= 1 and pred.shape == (3,)
    assert upsample(cams[0], 72).shape == (72, 72)


def _images(trained_phantom, n=24):
    result, df, data, out = trained_phantom
    test = df[df.split == "test"].head(n)
    images = xception_scale(np.stack([load_radiograph(p, 72) for p in test.path]))
    age, hand = phantom_masks(data, test.id, 72)
    return result, test, images, age, hand


def test_trained_model_looks_at_age_regions_more_than_untrained(trained_phantom):
    result, test, images, age, hand = _images(trained_phantom)
    trained, _ = mean_localisation(result.model, images, test.male.to_numpy(), age, hand)
    import keras
    keras.utils.set_random_seed(0)
    untrained_model = build_model(72, pooling="avg", head_width=64)
    untrained, _ = mean_localisation(untrained_model, images, test.male.to_numpy(), age, hand)
    assert trained > untrained, (trained, untrained)


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
