import os

import pytest

from tests.compat.matrix import Matrix
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


# ------------------------------------------------------------------------ compatibility matrix
_MATRIX: Matrix = Matrix()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    marker = getattr(report, "compat", None)
    if marker is None:
        return
    row, column, refused = marker
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = report.outcome
        note = ""
        if outcome == "skipped" and isinstance(report.longrepr, tuple):
            note = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif outcome == "passed" and refused:
            outcome, note = "refused", refused
        elif outcome == "failed":
            note = "see the test report"
        _MATRIX.record(row, column, outcome, note)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    marker = item.get_closest_marker("compat")
    if marker is not None:
        row, column = marker.args
        outcome.get_result().compat = (row, column, marker.kwargs.get("refused", ""))
    return outcome


def pytest_terminal_summary(terminalreporter: object) -> None:
    if not _MATRIX.cells:
        return
    table = _MATRIX.markdown()
    terminalreporter.write_sep("=", "compatibility matrix")  # type: ignore[attr-defined]
    terminalreporter.write_line(table)  # type: ignore[attr-defined]
    path = os.environ.get("LIGHTNING_REG_MATRIX")
    if path:
        with open(path, "w") as handle:
            handle.write(table)
