from __future__ import annotations

import pytest

from app.store.store import Store


@pytest.fixture
async def store(tmp_path):
    s = Store(tmp_path / "store.db")
    await s.open()
    yield s
    await s.close()
