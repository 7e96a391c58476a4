"""The input gate: rules that reject what is not a hand radiograph, and the learned score's calibration."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boneage.gate import (check_radiograph, feature_scores, fit_feature_gate, load_gate, looks_inverted)
from boneage.phantom import phantom_radiograph
from boneage.dicom_files import write_dicom
from boneage.reading import read_array, read_image

HAND = phantom_radiograph(100, False, 256, seed=4)[0]


def verdict(**changes):
    r = read_array(HAND)
    for k, v in changes.items(): setattr(r, k, v)
    return check_radiograph(r)


@pytest.mark.parametrize("changes,status,reason", [
    ({}, "ok", None),
    ({"modality": "CT"}, "rejected", "DICOM modality CT: not a radiograph"),
    ({"modality": "MR"}, "rejected", "DICOM modality MR"),
    ({"modality": "US"}, "rejected", "DICOM modality US"),
    ({"modality": "DX", "body_part": "CHEST"}, "rejected", "DICOM body part CHEST: not a hand"),
    ({"modality": "CR", "body_part": "HAND"}, "ok", None),
    ({"body_part": "EXTREMITY"}, "warning", "may not be a hand"),
    ({"pixels": HAND[:8, :8]}, "rejected", "8×8 pixels: too small"),
    ({"pixels": np.tile(HAND[:1], (1, 40))[:, :10000]}, "rejected", "too small"),
    ({"pixels": np.tile(HAND[:80], (1, 4))}, "rejected", "too elongated"),
    ({"colourfulness": 40.0}, "rejected", "a colour image"),
    ({"pixels": np.full((300, 200), 250, np.uint8)}, "rejected", "blank or nearly constant"),
    ({"pages": 3}, "warning", "3 frames or pages: only one was read"),
    ({"notes": ["window unusable (ValueError); used the robust percentile window"]}, "warning", "window unusable"),
])
def test_rules(changes, status, reason):
    g = verdict(**changes)
    assert g.status == status, g.reasons
    if reason: assert any(reason in r for r in g.reasons), g.reasons


def test_pydicom_ct_and_mr_files_are_rejected():
    import pydicom
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    for name in ("CT_small.dcm", "MR_small.dcm"):
        g = check_radiograph(read_image(folder / name))
        assert g.status == "rejected" and "DICOM modality" in g.reasons[0]


def test_real_radiographs_pass_the_rules_in_every_format(rsna_sample, tmp_path):
    files = sorted((rsna_sample / "images").glob("*.png"))
    assert len(files) == 40
    for i, p in enumerate(files):
        img = read_image(p).pixels
        forms = {"png": p}
        if i % 4 == 0:  # every form for a quarter of them: 8-bit JPEG, 16-bit PNG and TIFF, 12-bit DICOM, RGB PNG
            Image.fromarray(img).save(tmp_path / "a.jpg", quality=90); forms["jpg"] = tmp_path / "a.jpg"
            Image.fromarray(img.astype(np.uint16) * 257).save(tmp_path / "a16.png"); forms["png16"] = tmp_path / "a16.png"
            Image.fromarray(img.astype(np.uint16) * 257).save(tmp_path / "a16.tif"); forms["tif16"] = tmp_path / "a16.tif"
            write_dicom(tmp_path / "a.dcm", img.astype(np.uint16) * 16, Modality="CR", BodyPartExamined="HAND"); forms["dcm"] = tmp_path / "a.dcm"
            Image.fromarray(np.dstack([img] * 3)).save(tmp_path / "rgb.png"); forms["rgb"] = tmp_path / "rgb.png"
        for kind, f in forms.items():
            g = check_radiograph(read_image(f))
            assert g.status == "ok", (p.name, kind, g.reasons)
        assert not looks_inverted(img) and looks_inverted(255 - img)


def test_learned_score_flags_about_the_asked_share():
    rng = np.random.default_rng(0)
    mix = rng.normal(0, 1, (40, 40))
    train, valid, test = (rng.normal(0, 1, (n, 40)) @ mix for n in (2000, 2000, 4000))
    stats, info = fit_feature_gate(train, valid, quantile=0.99)
    flagged = (feature_scores(test, stats) > info["threshold"]).mean()
    assert 0.003 < flagged < 0.025, flagged  # about 1%
    assert (feature_scores(test[:100] * 6, stats) > info["threshold"]).all()  # far from the training cloud
    assert info["components"] == 40 and info["n_fit"] == 2000


def test_bundle_gate_round_trip(bundle_dir):
    from boneage.bundle import load_bundle
    stats, info = load_gate(load_bundle(bundle_dir))
    assert stats["components"].shape[1] == stats["mean"].shape[0] and info["threshold"] > 0
    assert info["file"] == "gate.npz" and 0 < info["quantile"] < 1


def test_scikit_learns_pca_gives_the_scores_of_the_principal_directions_by_hand():
    "The gate's statistics come from scikit-learn's PCA; the scores equal those of the SVD written out (as the gate did before)."
    rng = np.random.default_rng(3)
    train = rng.normal(size=(80, 12)) @ rng.normal(size=(12, 12)); valid = rng.normal(size=(30, 12)) @ rng.normal(size=(12, 12))
    stats, info = fit_feature_gate(train, valid, max_components=8)
    mean = train.mean(0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    variances = s[:8] ** 2 / 79
    by_hand = ((((valid - mean) @ vt[:8].T) ** 2) / (variances + 1e-6 * variances[0])).mean(axis=1)
    np.testing.assert_allclose(feature_scores(valid, stats), by_hand, rtol=1e-4)
    assert info["components"] == 8 and info["n_fit"] == 80
