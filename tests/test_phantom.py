import json

import numpy as np
import pandas as pd
import pytest

from boneage.data import load_dataset
from boneage.phantom import (CARPAL, EPIPHYSIS, HAND, BONE, age_region_mask, carpal_centres,
                             count_carpal_centres, epiphysis_stage, growth_plate_mask, open_growth_plates,
                             phantom_radiograph)
from boneage.phantom_dataset import (READER_SD_MONTHS, RSNA_MALE_FRACTION, drawn_bone_age, make_phantom_dataset, phantom_recipe,
                                     read_bone_age, read_mask, sample_rsna_like)


def test_deterministic_per_seed():
    a, b, c = (phantom_radiograph(100, True, 128, seed=s) for s in (5, 5, 6))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_image_and_mask_format():
    img, mask = phantom_radiograph(150, False, 256, seed=1)
    assert img.shape == mask.shape == (256, 256) and img.dtype == mask.dtype == np.uint8
    hand = (mask & HAND) > 0
    assert 0.15 < hand.mean() < 0.7  # the hand fills a good part of the film
    assert img[hand].mean() > img[~hand].mean() + 40  # tissue is brighter than background
    bone = (mask & BONE) > 0
    assert img[bone].mean() > img[hand & ~bone].mean() + 20  # bone is brighter than soft tissue
    assert (age_region_mask(mask) <= hand).all()


@pytest.mark.parametrize("male", [True, False])
def test_carpal_centres_appear_with_age(male):
    ages = (6, 36, 60, 96)
    counts = [count_carpal_centres(phantom_radiograph(a, male, 512, seed=3)[1]) for a in ages]
    assert counts == sorted(counts) and counts[0] == 2 and counts[-1] == 7
    assert counts == [len(carpal_centres(a, male)) for a in ages]
    assert carpal_centres(1, True) == [] and carpal_centres(216, True)[-1] == "pisiform"


def test_growth_plates_open_at_120_fused_at_216():
    for male in (True, False):
        assert open_growth_plates(120, male) == 21 and open_growth_plates(216, male) == 0
        assert epiphysis_stage("radius", 120, male).fusion == 0
        assert epiphysis_stage("radius", 216, male).fusion == 1
    # distal phalanges fuse first, the radius last
    s = [(epiphysis_stage("distal_phalanx", a, True).fusion, epiphysis_stage("radius", a, True).fusion) for a in (170, 195)]
    assert s[0][0] > s[0][1] and s[1][0] == 1 and s[1][1] < 1


def _plate_contrast(img, mask):
    "Mean brightness of the growth plates relative to the epiphyses: dark while open, as bright once fused."
    plates, epi = growth_plate_mask(mask) & ~((mask & EPIPHYSIS) > 0), (mask & EPIPHYSIS) > 0
    return img[plates].mean() / img[epi].mean()


def test_plates_drawn_dark_when_open_and_gone_when_fused():
    open_ = np.mean([_plate_contrast(*phantom_radiograph(120, True, 512, seed=s)) for s in range(3)])
    fused = np.mean([_plate_contrast(*phantom_radiograph(216, True, 512, seed=s)) for s in range(3)])
    assert open_ < 0.87 and fused > 0.95  # blur, grain and exposure vary; open plates stay clearly darker


def test_epiphyses_widen_then_cap():
    w = [epiphysis_stage("middle_phalanx", a, True).width for a in (30, 60, 100, 128, 160)]
    assert w == sorted(w) and w[0] < 0.5 and w[3] == pytest.approx(1.0) and w[4] > 1.0
    assert not epiphysis_stage("middle_phalanx", 12, True).visible


def test_girls_mature_earlier_at_same_bone_age():
    assert len(carpal_centres(60, False)) > len(carpal_centres(60, True))
    assert epiphysis_stage("radius", 190, False).fusion > epiphysis_stage("radius", 190, True).fusion
    a = (phantom_radiograph(60, True, 256, seed=0)[1] & CARPAL) > 0
    b = (phantom_radiograph(60, False, 256, seed=0)[1] & CARPAL) > 0
    assert b.sum() > a.sum()


def test_hand_size_carries_no_age():
    "Size is drawn at random whatever the age, so the hand's area on the film tells nothing about it."
    ages = np.random.default_rng(0).integers(1, 230, 60)
    area = [((phantom_radiograph(int(a), bool(i % 2), 128, seed=i)[1] & HAND) > 0).mean() for i, a in enumerate(ages)]
    assert abs(np.corrcoef(ages, area)[0, 1]) < 0.2
    assert max(area) > 1.5 * min(area)  # and it does vary


def test_rsna_like_sampling():
    ages, male = sample_rsna_like(20000, seed=0)
    assert abs(male.mean() - RSNA_MALE_FRACTION) < 0.01
    assert 120 < ages.mean() < 135 and ages.min() >= 1 and ages.max() <= 239  # RSNA: mean 127
    a2, m2 = sample_rsna_like(100, seed=0)
    assert np.array_equal(a2, sample_rsna_like(100, seed=0)[0])


def test_dataset_layout_and_reuse(tmp_path):
    d = make_phantom_dataset(tmp_path / "ph", n=10, size=96, seed=1, progress=False, n_jobs=1)
    labels = pd.read_csv(d / "labels.csv")
    assert list(labels.columns) == ["id", "boneage", "male"] and len(labels) == 10
    assert sorted(p.name for p in (d / "images").iterdir()) == sorted(f"{i}.png" for i in labels.id)
    assert read_mask(d, 1).shape == (96, 96)
    df = load_dataset(d, strict=True)  # the phantom passes the same checks as RSNA data
    assert len(df) == 10
    mtime = (d / "images" / "1.png").stat().st_mtime_ns
    assert make_phantom_dataset(d, n=10, size=96, seed=1, progress=False) == d
    assert (d / "images" / "1.png").stat().st_mtime_ns == mtime  # reused, not rewritten
    make_phantom_dataset(d, n=12, size=96, seed=1, progress=False, n_jobs=1)  # new recipe: rebuilt
    assert len(pd.read_csv(d / "labels.csv")) == 12 and json.loads((d / "phantom.json").read_text())["recipe"]["n"] == 12
    # same seed, same data set, byte for byte
    e = make_phantom_dataset(tmp_path / "ph2", n=10, size=96, seed=1, progress=False, n_jobs=2)
    f = make_phantom_dataset(tmp_path / "ph3", n=10, size=96, seed=1, progress=False, n_jobs=1)
    assert (e / "images" / "7.png").read_bytes() == (f / "images" / "7.png").read_bytes()


def _fail_drawing(args): raise RuntimeError("killed while drawing")


def test_a_new_data_set_replaces_the_old_only_once_it_is_complete(tmp_path, monkeypatch):
    from boneage import phantom_dataset
    d = make_phantom_dataset(tmp_path / "ph", n=6, size=64, seed=1, progress=False, n_jobs=1)
    monkeypatch.setattr(phantom_dataset, "_write_one", _fail_drawing)
    with pytest.raises(RuntimeError):
        make_phantom_dataset(d, n=8, size=64, seed=1, progress=False, n_jobs=1)
    assert len(pd.read_csv(d / "labels.csv")) == 6 and len(list((d / "images").glob("*.png"))) == 6  # the old one, whole
    monkeypatch.undo()
    make_phantom_dataset(d, n=8, size=64, seed=1, progress=False, n_jobs=1)
    assert len(list((d / "images").glob("*.png"))) == 8 and not [p for p in tmp_path.iterdir() if p.name.startswith(".ph")]


def test_drawing_code_is_part_of_the_recipe(tmp_path, monkeypatch):
    "The recipe hashes every module that decides what a phantom set holds: edit either, and the set is drawn anew."
    from boneage import data, phantom_dataset
    d = make_phantom_dataset(tmp_path / "ph", n=4, size=64, seed=1, progress=False, n_jobs=1)
    assert phantom_recipe(d)["code"] == data.code_fingerprint("boneage.phantom", "boneage.phantom_dataset")
    for edited in ("boneage.phantom", "boneage.phantom_dataset"):  # the drawing; the ages, sexes and layout
        monkeypatch.setattr(phantom_dataset, "code_fingerprint",
                            lambda *modules, e=edited: data.code_fingerprint(*modules) + ("-edited" if e in modules else ""))
        mtime = (d / "labels.csv").stat().st_mtime_ns
        make_phantom_dataset(d, n=4, size=64, seed=1, progress=False, n_jobs=1)
        assert phantom_recipe(d)["code"].endswith("-edited") and (d / "labels.csv").stat().st_mtime_ns != mtime, edited
        monkeypatch.undo()
        make_phantom_dataset(d, n=4, size=64, seed=1, progress=False, n_jobs=1)  # back to the real code: drawn again
    assert phantom_recipe(d / "images" / "1.png") == phantom_recipe(d) and phantom_recipe(tmp_path) is None


def test_given_ages(tmp_path):
    d = make_phantom_dataset(tmp_path / "g", size=80, bone_age_months=[12, 200], male=[True, False], progress=False, n_jobs=1)
    assert drawn_bone_age(d, [1, 2]).tolist() == [12, 200]                # drawn at the ages given
    labels = pd.read_csv(d / "labels.csv").boneage.to_numpy()
    assert (labels != [12, 200]).any() and (np.abs(labels - [12, 200]) <= 12).all()  # labelled by a reader, within 4 SD
    exact = make_phantom_dataset(tmp_path / "e", size=80, bone_age_months=[12, 200], male=[True, False], progress=False,
                                 n_jobs=1, reader_sd=0)
    assert pd.read_csv(exact / "labels.csv").boneage.tolist() == [12, 200]  # a perfect reader


def test_reader_error_sets_the_floor(tmp_path):
    "The labels stray from the drawn ages by the reader's error: its mean absolute size is the oracle's floor."
    drawn, _ = sample_rsna_like(5000, seed=3)
    labels = read_bone_age(drawn, seed=3)
    assert abs(np.abs(labels - drawn).mean() - READER_SD_MONTHS * np.sqrt(2 / np.pi)) < 0.15
    assert labels.min() >= 1 and labels.max() <= 239 and np.array_equal(read_bone_age(drawn, seed=3), labels)
    assert drawn_bone_age(tmp_path, [1]) is None  # not a phantom set


def test_missing_mask_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="3: no phantom mask"):
        read_mask(tmp_path, 3)
