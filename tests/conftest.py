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


def _shared_dir(tmp_path_factory) -> Path:
    """The folder every pytest-xdist worker of this run sees: the parent of each worker's basetemp (without
    xdist, the basetemp itself). Session fixtures run once per worker; what they make here is made once per run."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-artifacts"
    shared.mkdir(exist_ok=True)
    return shared


def _made_once(tmp_path_factory, key: str, name: str, make) -> Path:
    """``make(out)`` for ``shared-artifacts/<key>/<name>`` once per test run, whichever worker asks first.

    A file lock per key makes the first worker build while the others wait (with ``--dist loadscope`` two
    modules that need the same build run on different workers at the same time). ``make`` must write ``out``
    atomically (diffc's build, export and tiny-pipeline writers do: temporary folder, then rename), so a folder
    that exists is complete. Each output sits alone in its own folder, so a test may check that nothing else is
    left beside it.
    """
    import filelock

    shared = _shared_dir(tmp_path_factory)
    out = shared / key / name
    with filelock.FileLock(shared / f"{key}.lock"):
        if not out.exists():
            out.parent.mkdir(exist_ok=True)
            make(out)
    return out


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def _read_only_shared(tmp_path_factory, _isolated_engine_cache):
    """``get(key, name, make) -> Path``: :func:`_made_once`, remembered; at the end of the session, fails if a
    test changed one of the folders it handed out (a test that modifies one must ``shutil.copytree`` it first)."""
    seen: dict[Path, dict[str, tuple[int, int]]] = {}

    def get(key: str, name: str, make) -> Path:
        out = _made_once(tmp_path_factory, key, name, make)
        seen.setdefault(out, _snapshot(out))
        return out

    yield get
    changed = [str(out) for out, before in seen.items() if _snapshot(out) != before]
    assert not changed, f"a test modified the shared folder(s) {changed}: copy it first (shutil.copytree)"


@pytest.fixture(scope="session")
def _read_only_artifact(_read_only_shared):
    """Returns a getter for shared demo artifacts: ``get(profile, **build_options)`` builds ``demo`` with
    ``profile`` (a profile's name, or a :class:`~diffc.profiles.Profile`, keyed by its name: give a changed
    profile a name of its own) once per test run (not once per file and per xdist worker), read-only as
    :func:`_read_only_shared` checks."""
    import diffc

    def get(profile, **build_options) -> Path:
        key = profile if isinstance(profile, str) else profile.name

        def make(out: Path) -> None:
            # the build warms a host engine cache of its own (beside the artifact's folder, not in it): under
            # xdist another worker may have built it, and a test that checks what the build left there reads
            # this one (demo_host_cache), not its worker's
            old = os.environ.get("DIFFC_CACHE_DIR")
            os.environ["DIFFC_CACHE_DIR"] = str(_demo_host_cache(out))
            try:
                diffc.build("demo", profile, out, progress=False, **build_options)
            finally:
                if old is None:
                    os.environ.pop("DIFFC_CACHE_DIR", None)
                else:
                    os.environ["DIFFC_CACHE_DIR"] = old

        return _read_only_shared(key, "demo.diffc", make)

    return get


def _demo_host_cache(artifact: Path) -> Path:
    return artifact.parent.parent / f"{artifact.parent.name}-host-cache"


@pytest.fixture(scope="session")
def demo_host_cache():
    """``demo_host_cache(artifact) -> Path``: the host engine cache the build of a shared demo ``artifact``
    (:func:`_read_only_artifact`) warmed, ``shared-artifacts/<key>-host-cache``. Point ``DIFFC_CACHE_DIR`` at it
    (monkeypatch) to load the artifact with what its build compiled; a load adds entries there only for shapes
    the build did not compile."""
    return _demo_host_cache


def _with_cache(profile: str):
    """``profile`` with cpu-cache's ``[cache]`` table (DeepCache reuse: a ``unet_shallow`` beside the UNet), named
    ``<profile>-with-cache``: one build serves the tests of the plain backend and those of its cache pair."""
    import dataclasses

    from diffc.profiles import load_profile

    return dataclasses.replace(load_profile(profile), name=f"{profile}-with-cache",
                               cache=load_profile("cpu-cache").cache)


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


@pytest.fixture(scope="session")
def demo_cpu_openvino_artifact(_read_only_artifact) -> Path:
    """``diffc build demo --profile cpu`` (the default profile: OpenVINO bf16, quality-gated against the fp32
    twin) with cpu-cache's ``[cache]`` table, shared by the whole run: read it, never write it. The OpenVINO
    tests need the cache pair; every other test that wants the default ``cpu`` artifact takes this one, so the
    run builds it once (a build with the gate's fp32 twin: about a minute on 2 cores)."""
    pytest.importorskip("torch", reason="building the demo artifact needs the export extra")
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'diffc[openvino]')")
    return _read_only_artifact(_with_cache("cpu"))


@pytest.fixture(scope="session")
def demo_cpu_openvino_int8_artifact(_read_only_artifact) -> Path:
    """``diffc build demo --profile cpu-openvino-int8`` (calibration, Q/DQ, OpenVINO IR, the quality gate on the
    artifact itself) with cpu-cache's ``[cache]`` table, shared by the whole run: read it only."""
    pytest.importorskip("torch", reason="building the demo artifact needs the export extra")
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'diffc[openvino]')")
    return _read_only_artifact(_with_cache("cpu-openvino-int8"))


# ---------------------------------------------------------------------------------------------------------
# Tiny UNet pipelines (diffc.exporter.tiny) and their cpu-fp32 artifacts, once per test run
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_folder(_read_only_shared):
    """``tiny_folder(kind) -> Path``: ``write_tiny_pipeline(out, kind, seed=0)`` (``sd``, ``sdxl``, ``lcm``, ...)
    once per run. Read it (diffusers' ``from_pretrained``, ``diffc.build``), never write it: copy it first."""
    pytest.importorskip("torch", reason="writing the tiny pipelines needs the export extra")

    def get(kind: str) -> Path:
        from diffc.exporter.tiny import write_tiny_pipeline

        return _read_only_shared(f"tiny-{kind}-pipeline", "pipeline",
                                 lambda out: write_tiny_pipeline(out, kind, seed=0))

    return get


@pytest.fixture(scope="session")
def tiny_artifact(_read_only_shared, tiny_folder):
    """``tiny_artifact(kind, steps=4, sampler=None) -> Path``: ``diffc build`` of ``tiny_folder(kind)`` with
    the cpu-fp32 profile (onnxruntime, exact fp32: what parity tests compare against diffusers), ``steps`` steps
    and ``sampler`` (None: the pipeline's own scheduler), once per run. Read it only."""

    def get(kind: str, steps: int = 4, sampler: str | None = None) -> Path:
        from diffc.build import build

        folder = tiny_folder(kind)
        return _read_only_shared(f"tiny-{kind}-cpu-fp32-{steps}-steps-{sampler or 'own'}", "artifact.diffc",
                                 lambda out: build(folder, "cpu-fp32", out, steps=steps, sampler=sampler,
                                                   progress=False))

    return get


# ---------------------------------------------------------------------------------------------------------
# Tiny transformer (DiT) pipelines, their export and their cpu-fp32 artifacts, once per test run
# ---------------------------------------------------------------------------------------------------------
# Writing a tiny DiT pipeline trains its T5 / Gemma tokenizers and exporting one checks every component against
# torch: several test modules need the same ones, so they are made once per run in the folder the xdist workers
# share (keyed by what makes them), and handed out read-only (the end-of-session check above).


def _dit_key(kind: str, guidance: bool, what: str) -> str:
    """One folder (and lock) per output: ``dit-flux-no-guidance-pipeline``, ``dit-sd3-cpu-fp32-4-steps``."""
    return f"dit-{kind}" + ("" if guidance else "-no-guidance") + f"-{what}"


@pytest.fixture(scope="session")
def tiny_dit_folder(_read_only_shared):
    """``tiny_dit_folder(kind, guidance=True) -> Path``: ``write_tiny_dit_pipeline(out, kind, seed=0,
    guidance=guidance)`` once per run (``guidance=False``: FLUX.1-schnell). Read it (diffusers'
    ``from_pretrained``, ``diffc.build``), never write it: copy it first to change it."""
    pytest.importorskip("torch", reason="writing the tiny pipelines needs the export extra")
    pytest.importorskip("sentencepiece")  # the tiny T5 / Gemma tokenizers are trained when the pipeline is written

    def get(kind: str, guidance: bool = True) -> Path:
        from diffc.exporter.tiny_dit import write_tiny_dit_pipeline

        return _read_only_shared(_dit_key(kind, guidance, "pipeline"), "pipeline",
                                 lambda out: write_tiny_dit_pipeline(out, kind, seed=0, guidance=guidance))

    return get


@pytest.fixture(scope="session")
def tiny_dit_onnx(_read_only_shared, tiny_dit_folder):
    """``tiny_dit_onnx(kind) -> Path``: ``diffc export`` of ``tiny_dit_folder(kind)``, every component, parity
    checked against torch (the default ``export_pipeline``), once per run: ``<component>/model.onnx`` and
    ``export_report.json``. Read it only."""

    def get(kind: str) -> Path:
        from diffc.exporter import export_pipeline

        folder = tiny_dit_folder(kind)
        return _read_only_shared(_dit_key(kind, True, "onnx"), "onnx",
                                 lambda out: export_pipeline(folder, out, progress=False))

    return get


@pytest.fixture(scope="session")
def tiny_dit_artifact(_read_only_shared, tiny_dit_folder):
    """``tiny_dit_artifact(kind, guidance=True, steps=4) -> Path``: ``diffc build`` of ``tiny_dit_folder(kind,
    guidance)`` with the cpu-fp32 profile (onnxruntime, exact fp32: what parity tests compare against diffusers)
    for ``steps`` steps, once per run. Read it only."""

    def get(kind: str, guidance: bool = True, steps: int = 4) -> Path:
        from diffc.build import build

        folder = tiny_dit_folder(kind, guidance)
        return _read_only_shared(_dit_key(kind, guidance, f"cpu-fp32-{steps}-steps"), "artifact.diffc",
                                 lambda out: build(folder, "cpu-fp32", out, steps=steps, progress=False))

    return get
