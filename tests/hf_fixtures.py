"""Hugging Face datasets for the tests that read shards with it: offline, its caches in a temporary folder."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hf_datasets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """Hugging Face datasets, imported here (it takes a second) offline, its caches in a temporary folder: it reads
    those variables when imported."""
    variables = {**OFFLINE, "HF_HOME": str(tmp_path_factory.mktemp("hf"))}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        datasets = importlib.import_module("datasets")
        assert datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE, "it must not reach the network"
        yield datasets
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
