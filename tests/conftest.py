import os

import pytest

from tests.helpers import BlobsDataModule, DigitsDataModule, TinyClassifier


@pytest.fixture(autouse=True)
def _restore_environment():
    """Undo what a test's Trainer wrote to ``os.environ`` (``MASTER_PORT``, ``PL_GLOBAL_SEED``...).

    A DDP launch stores its port in ``MASTER_PORT``; left there, every later DDP test would bind
    the same port while the previous run's socket may not be released yet.
    """
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@pytest.fixture
def blobs() -> BlobsDataModule:
    return BlobsDataModule()


@pytest.fixture
def digits() -> DigitsDataModule:
    return DigitsDataModule()


@pytest.fixture
def tiny_model() -> TinyClassifier:
    return TinyClassifier()
