import pytest

from tests.helpers import BlobsDataModule, DigitsDataModule, TinyClassifier


@pytest.fixture
def blobs() -> BlobsDataModule:
    return BlobsDataModule()


@pytest.fixture
def digits() -> DigitsDataModule:
    return DigitsDataModule()


@pytest.fixture
def tiny_model() -> TinyClassifier:
    return TinyClassifier()
