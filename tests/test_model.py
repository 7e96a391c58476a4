import warnings

import numpy as np
import pytest
import keras

from boneage.model import WeightsError, build_model, parameter_table


def test_reference_architecture():
    m = build_model(96)
    assert [t.name for t in m.inputs] == ["image", "male"]
    assert m.get_layer("pool").__class__.__name__ == "GlobalMaxPooling2D"
    assert m.get_layer("head").units == 10 and m.get_layer("head").get_config()["activation"] == "relu"
    assert m.get_layer("standardized_age").units == 1
    assert all(layer.trainable for layer in m.layers)
    # the sex joins the pooled image features right before the dense head
    concat = m.get_layer("features_and_sex")
    assert concat.output.shape[-1] == m.get_layer("features").output.shape[-1] + 1
    assert m.get_layer("block14_sepconv2_act") is not None  # the last conv block, for Grad-CAM


def test_sex_changes_the_prediction():
    m = build_model(72)
    img = np.random.default_rng(0).uniform(-1, 1, (1, 72, 72, 3)).astype("float32")
    a = m.predict({"image": img, "male": np.ones((1, 1), "float32")}, verbose=0)
    b = m.predict({"image": img, "male": np.zeros((1, 1), "float32")}, verbose=0)
    assert a.shape == (1, 1) and not np.allclose(a, b)


def test_without_the_sex_input():
    m = build_model(72, use_sex=False)
    img = np.random.default_rng(0).uniform(-1, 1, (1, 72, 72, 3)).astype("float32")
    a = m.predict({"image": img, "male": np.ones((1, 1), "float32")}, verbose=0)
    b = m.predict({"image": img, "male": np.zeros((1, 1), "float32")}, verbose=0)
    assert np.array_equal(a, b) and [t.name for t in m.inputs] == ["image", "male"]
    assert m.get_layer("head").input.shape[-1] == m.get_layer("features").output.shape[-1]  # nothing joins the features


def test_starts_near_the_mean_age():
    m = build_model(72, age_mean=120.0, age_std=40.0)
    x = {"image": np.zeros((4, 72, 72, 3), "float32"), "male": np.ones((4, 1), "float32")}
    assert np.abs(m.predict(x, verbose=0) - 120).max() < 40


def test_configurable_head_and_frozen_backbone():
    m = build_model(72, head_width=32, pooling="avg", trainable_backbone=False)
    assert m.get_layer("head").units == 32 and m.get_layer("pool").__class__.__name__ == "GlobalAveragePooling2D"
    trainable = sum(int(np.prod(v.shape)) for v in m.trainable_weights)
    assert trainable == sum(l.count_params() for l in (m.get_layer("head"), m.get_layer("standardized_age")))


@pytest.mark.parametrize("name,size", [("InceptionV3", 75), ("EfficientNetB0", 64), ("MobileNetV2", 64)])
def test_other_backbones(name, size):
    m = build_model(size, name)
    out = m.predict({"image": np.zeros((1, size, size, 3), "float32"), "male": np.ones((1, 1), "float32")}, verbose=0)
    assert out.shape == (1, 1) and np.isfinite(out).all()


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'Xceptoin'"):
        build_model(72, "Xceptoin")


def test_mixed_precision_output_is_float32():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        m = build_model(72)
        assert m.get_layer("head").compute_dtype == "float16"
        assert m.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_imagenet_offline_is_one_clear_error(monkeypatch):
    import keras.src.applications.xception as xc
    def offline(*a, **k): raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(xc.file_utils, "get_file", offline)
    with pytest.raises(WeightsError) as e:
        build_model(72, weights="imagenet")
    msg = str(e.value)
    assert "\n" not in msg and "xception_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg and "weights='path/to" in msg


def test_local_weights_file(tmp_path):
    f = tmp_path / "xception_notop.weights.h5"
    src = keras.applications.Xception(include_top=False, weights=None, input_shape=(72, 72, 3))
    src.save_weights(f)
    m = build_model(72, weights=str(f))
    np.testing.assert_array_equal(m.get_layer("block3_sepconv1").get_weights()[0], src.get_layer("block3_sepconv1").get_weights()[0])
    with pytest.raises(WeightsError, match="missing.h5: weights file not found"):
        build_model(72, weights=str(tmp_path / "missing.h5"))
    other = tmp_path / "mobilenet.weights.h5"
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(72, 72, 3)).save_weights(other)
    with warnings.catch_warnings(record=True) as said, pytest.raises(WeightsError, match="mobilenet.weights.h5: not Xception no-top weights"):
        warnings.simplefilter("always")
        build_model(72, weights=str(other))
    assert not [w for w in said if "freshly-initialized" in str(w.message)]  # the one error, not 74 Keras warnings before it


def test_parameter_table():
    m = build_model(72)
    t = parameter_table(m)
    assert t.parameters.sum() == m.count_params() and "head" in set(t.part) and "block14" in set(t.part)
