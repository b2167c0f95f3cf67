import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_engine_cache(tmp_path_factory):
    """Keep the per-host engine cache of every test inside pytest's temp folder, never in ~/.cache.

    Session-scoped (and set in os.environ directly) so module-scoped fixtures that build artifacts see it too.
    """
    old = os.environ.get("DIFFC_CACHE_DIR")
    os.environ["DIFFC_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "engine-cache")
    yield
    if old is None:
        os.environ.pop("DIFFC_CACHE_DIR", None)
    else:
        os.environ["DIFFC_CACHE_DIR"] = old
