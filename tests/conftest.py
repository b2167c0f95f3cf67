import os
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------------------
# One demo artifact per profile for the whole test run, shared read-only by every test file that needs it
# ---------------------------------------------------------------------------------------------------------


def _shared_artifact(tmp_path_factory, profile: str, **build_options) -> Path:
    """Build ``demo`` with ``profile`` once per test run, not once per file and per xdist worker.

    Session fixtures run once per pytest-xdist worker, so the artifact lives in the folder the workers share
    (the parent of each worker's basetemp) and a file lock makes the first worker build it while the others
    wait. Each artifact sits alone in its own folder, so a test may check that nothing else is left beside it.
    The build itself is atomic (temporary folder, then rename): a folder that exists is complete.
    """
    import filelock

    import diffc

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-artifacts"
    shared.mkdir(exist_ok=True)
    out = shared / profile / "demo.diffc"
    with filelock.FileLock(shared / f"{profile}.lock"):
        if not out.exists():
            out.parent.mkdir(exist_ok=True)
            diffc.build("demo", profile, out, progress=False, **build_options)
    return out


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def _read_only_artifact(tmp_path_factory, _isolated_engine_cache):
    """Returns a getter for shared artifacts; at the end of the session, fails if a test changed one (a test
    that modifies an artifact must ``shutil.copytree`` it first)."""
    seen: dict[Path, dict[str, tuple[int, int]]] = {}

    def get(profile: str, **build_options) -> Path:
        out = _shared_artifact(tmp_path_factory, profile, **build_options)
        seen.setdefault(out, _snapshot(out))
        return out

    yield get
    changed = [str(out) for out, before in seen.items() if _snapshot(out) != before]
    assert not changed, f"a test modified the shared artifact(s) {changed}: copy it first (shutil.copytree)"


@pytest.fixture(scope="session")
def demo_cpu_artifact(_read_only_artifact) -> Path:
    """``diffc build demo --profile cpu-fp32 --verify-passes`` (onnxruntime, exact fp32: what the tests compare
    against; the default ``cpu`` profile is OpenVINO bf16), shared by the whole run: read it, never write it."""
    pytest.importorskip("torch", reason="building the demo artifact needs the export extra")
    return _read_only_artifact("cpu-fp32", verify_passes=True)


@pytest.fixture(scope="session")
def demo_cpu_cache_artifact(_read_only_artifact) -> Path:
    """``diffc build demo --profile cpu-cache``, shared by the whole run: read it, never write it."""
    pytest.importorskip("torch", reason="building the demo artifact needs the export extra")
    return _read_only_artifact("cpu-cache")


@pytest.fixture(scope="session")
def demo_cpu_int8_artifact(_read_only_artifact) -> Path:
    """``diffc build demo --profile cpu-int8`` (quality gate included), shared by the whole run: read it only."""
    pytest.importorskip("torch", reason="building the demo artifact needs the export extra")
    return _read_only_artifact("cpu-int8")
