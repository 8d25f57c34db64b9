"""Shared test set-up: 4 logical CPU devices, so in-process tests can mirror over 1, 2 or 4."""

import os

import pytest
from absl import logging as absl_logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from trainer import distribute  # noqa: E402  (after the environment is set)

# Must happen before any TF op runs in this process; every test shares the 4 devices.
distribute.configure_cpu_replicas(4)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One TFDS data_dir for the session: the first test that loads an embedded dataset there
    prepares it, the others reuse it."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(autouse=True)
def _absl_verbosity_restored():
    """Each test leaves absl's logger at the level it found: an in-process command
    line parses absl's flags, which sets the verbosity (WARNING by default), and TF's SavedModel
    writer changes it too; left as they were, they would hide INFO lines from a later test's
    `caplog` depending on the test order."""
    absl_logger = absl_logging.get_absl_logger()
    level = absl_logger.level  # Its own level (often NOTSET: the root's), not the effective one.
    yield
    absl_logger.setLevel(level)
