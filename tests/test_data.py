import cv2
import numpy as np
import pandas as pd
import pytest

from boneage.clinical import parse_sex
from boneage.dicom_files import write_dicom
from boneage.data import (SPLIT_FRACTIONS, DataError, MissingStepError, load_dataset, part_sizes, read_labels,
                          read_split, split_dataset, split_fingerprint, summarize_problems, write_split)


def make_folder(tmp_path, csv_text, image_ids, ext="png", images_sub="images"):
    img_dir = tmp_path / images_sub if images_sub else tmp_path
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in image_ids:
        if ext == "dcm": write_dicom(img_dir / f"{i}.{ext}", np.zeros((8, 8), np.uint16))
        else: cv2.imwrite(str(img_dir / f"{i}.{ext}"), np.zeros((8, 8), np.uint8))
    (tmp_path / "labels.csv").write_text(csv_text)
    return tmp_path


def reasons(df):
    p = df.attrs["problems"]
    return dict(zip(p["id"], p["reason"]))


def test_clean_folder(tmp_path):
    d = make_folder(tmp_path, "id,boneage,male\n1,120,True\n2,36,False\n", [1, 2])
    df = load_dataset(d, strict=True)
    assert list(df.columns) == ["id", "bone_age_months", "male", "path"]
    assert df.id.tolist() == [1, 2] and df.male.tolist() == [True, False]
    assert df.bone_age_months.tolist() == [120.0, 36.0]
    assert len(df.attrs["problems"]) == 0


@pytest.mark.parametrize("header,row", [
    ("Image ID,Bone Age (months),Sex", "5,100,M"),
    ("image_id,bone_age,gender", "5,100,male"),
    ("ID , BoneAge , Male", "5,100,1"),
])
def test_header_variants(tmp_path, header, row):
    d = make_folder(tmp_path, f"{header}\n{row}\n", [5])
    df = load_dataset(d, strict=True)
    assert df.id.tolist() == [5] and df.male.tolist() == [True] and df.bone_age_months.tolist() == [100.0]


@pytest.mark.parametrize("ext", ["png", "PNG", "jpg", "JPEG", "tif", "dcm"])
def test_image_suffixes_any_case(tmp_path, ext):
    d = make_folder(tmp_path, "id,boneage,male\n3,50,F\n", [3], ext=ext)
    assert load_dataset(d, strict=True).path[0].name == f"3.{ext}"


def test_images_beside_csv(tmp_path):
    d = make_folder(tmp_path, "id,boneage,male\n3,50,F\n", [3], images_sub=None)
    assert len(load_dataset(d, strict=True)) == 1


def test_missing_column_is_one_clear_error(tmp_path):
    d = make_folder(tmp_path, "id,age,male\n1,120,True\n", [1])
    with pytest.raises(DataError, match=r"labels.csv: no column for 'bone_age_months'.*found \['id', 'age', 'male'\]"):
        load_dataset(d)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="label file not found"):
        read_labels(tmp_path / "nope.csv")
    (tmp_path / "a.csv").write_text("id,boneage,male\n"); (tmp_path / "b.csv").write_text("x\n")
    with pytest.raises(DataError, match="exactly one .csv"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("row,reason", [
    ("7,120,M", "missing image"),
    ("1,,M", "age missing"),
    ("1,NaN,M", "age missing"),
    ("1,-3,M", "age -3 is negative"),
    ("1,241,M", "age 241 months is over 240"),
    ("1,abc,M", "age 'abc' is not a number"),
    ("1,100,X", "sex 'X' is not one of"),
    ("1,100,", "sex '' is not one of"),
    ("../../etc/passwd,100,M", "is not an integer"),
    ("1.5,100,M", "is not an integer"),
])
def test_each_bad_row_is_reported_with_id_and_reason(tmp_path, row, reason):
    d = make_folder(tmp_path, f"id,boneage,male\n{row}\n2,60,F\n", [1, 2])
    df = load_dataset(d, verbose=False)
    bad_id = row.split(",")[0]
    assert df.id.tolist() == [2]  # the good row survives
    assert reason in reasons(df)[bad_id]
    with pytest.raises(DataError, match=reason.replace("(", r"\(").split("'")[0]):
        load_dataset(d, strict=True)


def test_duplicates_and_unlabelled_images(tmp_path, capsys):
    d = make_folder(tmp_path, "id,boneage,male\n1,10,M\n1,12,M\n2,20,F\n", [1, 2, 3])
    df = load_dataset(d)
    assert df.id.tolist() == [2]
    r = reasons(df)
    assert r["1"] == "duplicate id (2 rows)" and r["3"] == "image without a label row"
    assert (df.attrs["problems"].id == "1").sum() == 2  # both rows listed, neither dropped silently
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "3 problem(s) in 3 rows" in out  # one summary line


def test_strict_lists_every_problem_in_one_line(tmp_path):
    d = make_folder(tmp_path, "id,boneage,male\n1,10,Q\n2,500,F\n3,30,M\n", [1, 2])
    with pytest.raises(DataError) as e:
        load_dataset(d, strict=True)
    msg = str(e.value)
    assert "\n" not in msg and "1: sex 'Q'" in msg and "2: age 500" in msg and "3: missing image" in msg


def test_rsna_and_other_sex_spellings_in_a_label_file(tmp_path):
    d = make_folder(tmp_path, "id,boneage,male\n1,10,True\n2,20,False\n3,30,M\n4,40,female\n5,50,1\n6,60,girl\n", range(1, 7))
    assert load_dataset(d, strict=True).male.tolist() == [True, False, True, False, True, False]


def test_zero_padded_ids_are_one_id(tmp_path):
    d = make_folder(tmp_path, "id,boneage,male\n007,10,M\n8,20,F\n008,30,F\n", ["007", "9"])
    df = load_dataset(d, verbose=False)
    assert df.id.tolist() == [7] and df.path[0].name == "007.png"  # 007 is id 7, and its file is found
    r = reasons(df)
    assert r["8"] == r["008"] == "duplicate id (2 rows)" and r["9"] == "image without a label row"


def test_excel_csv_with_byte_order_mark(tmp_path):
    d = make_folder(tmp_path, "", [1])
    (tmp_path / "labels.csv").write_bytes("\ufeffid,boneage,male\n1,120,M\n".encode("utf-8"))
    assert load_dataset(d, strict=True).id.tolist() == [1]


def test_summary():
    p = pd.DataFrame({"id": ["1", "2", "3"], "reason": ["missing image", "missing image", "age 300 months is over 240"]})
    assert summarize_problems(p, 10) == "3 problem(s) in 10 rows: 2 × missing image; 1 × age … months is over …"
    assert summarize_problems(p.iloc[:0], 10) == "all 10 rows usable"


def _table(n, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": np.arange(n), "bone_age_months": rng.integers(1, 229, n).astype(float),
                         "male": rng.random(n) < 0.54})


@pytest.mark.parametrize("n", [8, 13, 60, 1000, 12611])
def test_part_sizes_are_within_one_row_of_their_share(n):
    sizes = part_sizes(n, SPLIT_FRACTIONS)
    assert sum(sizes.values()) == n
    assert all(abs(sizes[k] - f * n) < 1 for k, f in SPLIT_FRACTIONS.items()), sizes


def test_split_is_seeded_disjoint_and_stratified():
    df = _table(1000)
    a, b, c = split_dataset(df, seed=1), split_dataset(df, seed=1), split_dataset(df, seed=2)
    assert a.split.tolist() == b.split.tolist() and a.split.tolist() != c.split.tolist()
    assert a.split.value_counts().to_dict() == part_sizes(1000, SPLIT_FRACTIONS)
    # stratified: the share of boys and of each age bin is about the same in every split
    # (calib, 50 images over 20 strata, is left out: rounding within strata moves its shares by a few images)
    big = a[a.split != "calib"]
    by_split = big.groupby("split").male.mean()
    assert by_split.max() - by_split.min() < 0.04
    young = big.assign(y=big.bone_age_months < 72).groupby("split").y.mean()
    assert young.max() - young.min() < 0.04


def test_split_small_data_falls_back():
    s = split_dataset(_table(12), seed=0)
    assert s.split.value_counts().to_dict() == part_sizes(12, SPLIT_FRACTIONS) and s.split.notna().all()


def test_split_too_few_rows_or_bad_fractions_is_one_clear_error():
    with pytest.raises(DataError, match="do not add up"):
        split_dataset(_table(20), fractions={"train": 0.5, "valid": 0.2, "test": 0.2})
    with pytest.raises(DataError, match="3 usable rows are too few to split into"):
        split_dataset(_table(3))


def test_split_file_keeps_relative_paths_and_moves_with_its_folder(tmp_path):
    d = make_folder(tmp_path / "run" / "data", "id,boneage,male\n" + "".join(f"{i},{10 * i},M\n" for i in range(1, 11)), range(1, 11))
    df = split_dataset(load_dataset(d), seed=0)
    f = write_split(df, tmp_path / "run")
    assert f.read_text().splitlines()[1].endswith(",data/images/" + df.path[0].name) and str(tmp_path) not in f.read_text()
    (tmp_path / "run").rename(tmp_path / "moved")
    back = read_split(tmp_path / "moved")
    assert split_fingerprint(back) == split_fingerprint(df) and back.path[0] == (tmp_path / "moved" / "data" / "images" / df.path[0].name)
    (tmp_path / "moved" / "data" / "images" / "3.png").unlink()
    with pytest.raises(DataError, match="1 images it lists are gone"):
        read_split(tmp_path / "moved")
    with pytest.raises(MissingStepError, match=r"split.csv: not found; run the data notebook \(00_data\) first"):
        read_split(tmp_path / "nowhere")


def test_real_sample(rsna_sample):
    df = load_dataset(rsna_sample, strict=True)
    assert len(df) == 40 and df.bone_age_months.between(24, 216).all()
    assert df.male.sum() == 26


def test_full_rsna_label_split(shared_data):
    labels = read_labels(shared_data / "boneage-training-dataset.csv")
    assert len(labels) == 12611
    df = labels.astype({"id": int, "bone_age_months": float}).assign(male=labels.male.map(parse_sex))
    s = split_dataset(df, seed=42)
    assert s.split.value_counts().to_dict() == part_sizes(12611, SPLIT_FRACTIONS)
    assert s.groupby("id").split.nunique().max() == 1
    assert s.split.tolist() == split_dataset(df, seed=42).split.tolist()
