from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from kiapi.app import create_app
from kiapi.config import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(_env_file=None, files_root=tmp_path / "files", memory_limit_gb=4.0)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c
