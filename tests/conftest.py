import os
import pytest
from boneage.data import find_shared_data


@pytest.fixture(scope="session")
def shared_data():
    "The shared RSNA files: required under CI=true, skipped with a reason elsewhere."
    path = find_shared_data()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but the shared RSNA data folder (../shared/data or $BONEAGE_SHARED_DATA) is missing")
        pytest.skip("shared RSNA data not found (../shared/data beside the repository, or $BONEAGE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def rsna_sample(shared_data):
    return shared_data / "rsna-sample"


@pytest.fixture(scope="session")
def trained_phantom(tmp_path_factory):
    "A model trained at tiny settings on phantoms (the course's settings for random weights), shared by tests."
    from boneage.data import load_dataset, split_dataset
    from boneage.phantom import make_phantom_dataset
    from boneage.train import TrainConfig, train
    tmp = tmp_path_factory.mktemp("trained")
    data = make_phantom_dataset(tmp / "ph", n=160, size=96, seed=11, progress=False)
    df = split_dataset(load_dataset(data), seed=0)
    cfg = TrainConfig(image_size=72, epochs=10, batch_size=8, learning_rate=3e-4, pooling="avg", head_width=64,
                      batchnorm_momentum=0.9, seed=0)
    result = train(df, tmp / "out", cfg, verbose=False)
    return result, df, data, tmp / "out"
