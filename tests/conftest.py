import os

import pytest

# every test uses its own specplan home, so a developer's measured profiles never leak into tests
@pytest.fixture(autouse=True)
def _specplan_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPECPLAN_HOME", str(tmp_path_factory.mktemp("specplan_home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield


# shared tiny-model fixtures of the engine tests (tests/engine_fixtures.py)
from engine_fixtures import tiny_model  # noqa: E402,F401
