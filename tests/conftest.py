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
