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
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def blobs() -> BlobsDataModule:
    return BlobsDataModule()


@pytest.fixture
def digits() -> DigitsDataModule:
    return DigitsDataModule()


@pytest.fixture
def tiny_model() -> TinyClassifier:
    return TinyClassifier()
