"""Transfer learning's pieces: backbone weights as a file (the ImageNet path takes the same file route), the folds, the table."""
import numpy as np
import pandas as pd
import pytest

from boneage.model import build_model
from boneage.transfer import fold_split, kfold_ids, save_backbone_weights, starting_weights, transfer_table


def _weighted(model): return [l for l in model.layers if l.weights]


@pytest.mark.parametrize("backbone", ["Xception", "EfficientNetB0"])
def test_a_backbone_file_starts_a_new_model_where_the_old_one_ended(backbone, tmp_path):
    import keras
    keras.utils.set_random_seed(1); trained = build_model(72, backbone)
    keras.utils.set_random_seed(2); fresh = build_model(72, backbone)
    f = save_backbone_weights(trained, backbone, tmp_path / "backbone.weights.h5")
    # the route a user's local ImageNet file takes: build_model(weights=file)
    loaded = build_model(72, backbone, str(f))
    same = [all(np.array_equal(a, b) for a, b in zip(x.get_weights(), y.get_weights())) for x, y in zip(_weighted(trained), _weighted(loaded))]
    assert all(same[:-2]) and not any(same[-2:])  # every backbone layer carried over, the head not
    # the route the cross-validation takes: the fresh model's head, the file's backbone
    start = starting_weights(fresh, f)
    fresh.set_weights(start)
    for i, (a, b, c) in enumerate(zip(_weighted(trained), _weighted(fresh), _weighted(build_model(72, backbone)))):
        expected = a if i < len(same) - 2 else b
        assert all(np.array_equal(x, y) for x, y in zip(b.get_weights(), expected.get_weights()))


def test_a_file_of_another_backbone_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a EfficientNetB0 backbone"):
        save_backbone_weights(build_model(72), "EfficientNetB0", tmp_path / "x.weights.h5")


def test_folds_hold_out_each_image_once_across_the_ages():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"id": range(40), "bone_age_months": rng.uniform(20, 220, 40), "male": rng.random(40) < 0.5})
    folds = kfold_ids(df, 4, seed=3)
    assert sorted(np.bincount(folds)) == [10, 10, 10, 10]
    quartile = pd.qcut(df.bone_age_months.rank(method="first"), 4, labels=False)
    assert (pd.crosstab(folds, quartile).values >= 2).all()  # every fold spans the ages
    for k in range(4):
        split = fold_split(df, folds, k, n_valid=3, seed=3).split
        assert (split == "test").sum() == 10 and (split == "valid").sum() == 3 and not ((split == "valid") & (folds == k)).any()
    np.testing.assert_array_equal(kfold_ids(df, 4, seed=3), folds)


def test_table_reads_each_start_against_random():
    y = np.arange(10.0) * 10
    oof = pd.DataFrame({"id": range(10), "male": True, "bone_age_months": y, "fold": np.arange(10) % 2,
                        "pretrained": y + 1, "random": y + 5, "mean": y.mean()})
    t = transfer_table(oof, n_boot=200).set_index("start")
    assert t.MAE.to_dict() == {"pretrained": 1.0, "random": 5.0, "mean": 25.0}
    assert t.loc["pretrained", "MAE − random (95% CI)"] == "-4.0 (-4.0 to -4.0)" and t.loc["random", "MAE − random (95% CI)"] == "—"
