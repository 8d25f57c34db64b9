"""Shared test set-up: 4 logical CPU devices, so in-process tests can mirror over 1, 2 or 4."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from trainer import distribute  # noqa: E402  (after the environment is set)

# Must happen before any TF op runs in this process; every test shares the 4 devices.
distribute.configure_cpu_replicas(4)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One TFDS data_dir for the session: the first test that loads an embedded dataset there
    prepares it, the others reuse it."""
    return str(tmp_path_factory.mktemp("tfds"))
