"""Start and stop a real ``tritonserver`` on a model repository, bound to 127.0.0.1.

The binary is one already on ``PATH`` (NVIDIA's container) or the one bundled in the ``nvidia-pytriton`` wheel
(the ``serve`` extra). That wheel's Python backend stub is linked against libpython: it must find this
Python's ``LIBDIR`` and the wheel's ``nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH``, and this environment's
``bin`` first on ``PATH`` (so the stub's Python is this one, with diffc installed). Without that it loads the
system libpython and fails with ``'_thread.RLock' object has no attribute '_recursion_count'``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from diffc.errors import BackendUnavailableError, DiffcError

log = logging.getLogger("diffc.serve")


class ServerError(DiffcError):
    """The Triton server did not start, or stopped on its own; the message holds the end of its log."""

    code = "server_error"


def _bundled() -> Path | None:
    """The ``nvidia-pytriton`` wheel's ``tritonserver`` folder (bin/, backends/, python_backend_stubs/), if any."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.origin:
        return None
    root = Path(spec.origin).parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def find_tritonserver() -> Path:
    """The ``tritonserver`` binary to run: one on ``PATH`` first (NVIDIA's container sets it up), else the
    ``serve`` extra's."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path)
    bundled = _bundled()
    if bundled is not None:
        return bundled / "bin" / "tritonserver"
    raise BackendUnavailableError("no tritonserver binary: install the serve extra (pip install 'diffc[serve]', "
                                  "which bundles Triton's server with its Python backend), or run inside NVIDIA's "
                                  "Triton container (nvcr.io/nvidia/tritonserver:*-py3), which has it on PATH")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(binary: Path) -> dict[str, str]:
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    bundled = _bundled()
    if bundled is not None and binary == bundled / "bin" / "tritonserver":
        libs.append(str(bundled.parent.parent / "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _backends(binary: Path, workspace: Path) -> Path | None:
    """The backend folder for the bundled binary: its python backend plus the stub built for this Python's
    version (the wheel ships one per version; Triton looks for ``backends/python/triton_python_backend_stub``).
    A binary on PATH brings its own (``/opt/tritonserver/backends``): None."""
    bundled = _bundled()
    if bundled is None or binary != bundled / "bin" / "tritonserver":
        return None
    stub = bundled / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
        "triton_python_backend_stub"
    if not stub.is_file():
        raise BackendUnavailableError(f"the bundled Triton has no Python backend stub for Python "
                                      f"{sys.version_info[0]}.{sys.version_info[1]}; use Python 3.8-3.13")
    numpy = _numpy_version()
    if numpy[0] >= 2:
        raise BackendUnavailableError(
            f"the Triton bundled with nvidia-pytriton cannot run with numpy {'.'.join(map(str, numpy))}: its Python "
            "backend stub was built with a pybind11 that predates numpy 2 and garbles every tensor it hands over "
            "(nvidia-pytriton itself requires numpy<2); install the serve extra into its own environment "
            "(pip install 'diffc[serve]' resolves numpy<2), or use NVIDIA's Triton container")
    python = workspace / "backends" / "python"
    python.mkdir(parents=True)
    for f in (bundled / "backends" / "python").iterdir():
        if f.is_file():
            (python / f.name).symlink_to(f)
    (python / stub.name).symlink_to(stub)
    return workspace / "backends"


def _numpy_version() -> tuple[int, ...]:
    """The numpy the stub will import (this Python's), read from its metadata: the launcher need not import it."""
    from importlib.metadata import version

    return tuple(int(p) for p in re.findall(r"\d+", version("numpy"))[:2])


class TritonServer:
    """A ``tritonserver`` process on ``repository``, HTTP and gRPC on 127.0.0.1 only, metrics off.

    Use it as a context manager: entering starts it and waits until the server and every model are ready
    (``timeout`` seconds), leaving stops it (SIGTERM, then SIGKILL to its process group after ``stop_timeout``)
    and removes its workspace. ``http_port`` / ``grpc_port`` 0: free ports are picked.
    """

    def __init__(self, repository: str | os.PathLike, *, http_port: int = 0, grpc_port: int = 0,
                 timeout: float = 120.0, stop_timeout: float = 10.0, log_verbose: int = 0):
        self.repository = Path(repository).absolute()
        self.binary = find_tritonserver()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.timeout, self.stop_timeout, self.log_verbose = timeout, stop_timeout, log_verbose
        self.process: subprocess.Popen | None = None
        self.workspace: Path | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return (self.workspace / "server.log").read_text(errors="replace")[-chars:]
        except (OSError, TypeError):
            return ""

    def log_errors(self, lines: int = 12) -> str:
        """What the log says went wrong: Triton's error lines (``E1203 ...``) and models it marks UNAVAILABLE
        (which carry the model's own exception, e.g. diffc's message), else the end of the log."""
        text = self.log_tail(1 << 20)
        errors = [ln.strip() for ln in text.splitlines() if re.match(r"E\d{4} ", ln) or "UNAVAILABLE" in ln]
        return "\n".join(errors[-lines:]) if errors else text[-4000:]

    def start(self) -> TritonServer:
        self.workspace = Path(tempfile.mkdtemp(prefix="diffc-triton-"))
        try:
            cmd = [str(self.binary), f"--model-repository={self.repository}",
                   "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                   "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                   "--allow-metrics=false", f"--exit-timeout-secs={int(self.stop_timeout)}",
                   "--strict-readiness=true", f"--log-verbose={self.log_verbose}"]
            backends = _backends(self.binary, self.workspace)
            if backends is not None:
                cmd.append(f"--backend-directory={backends}")
            logfile = open(self.workspace / "server.log", "wb")  # noqa: SIM115 (the child writes it until it ends)
            with logfile:
                # its own process group: Ctrl-C in a terminal reaches diffc only, which stops the server itself
                self.process = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=_environment(self.binary), start_new_session=True)
            log.info("started %s (pid %d) on %s", self.binary, self.process.pid, self.repository)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.process.returncode} before it was ready:\n"
                                  f"{self.log_errors()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.25)
        raise ServerError(f"tritonserver was not ready after {self.timeout:g} s:\n{self.log_errors()}")

    def stop(self) -> int | None:
        """SIGTERM, wait for the models to unload, then SIGKILL the process group if it is still there; remove the
        workspace. Returns the exit status (None if it never started)."""
        status = None
        p, self.process = self.process, None
        if p is not None:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(self.stop_timeout + 10)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver (pid %d) did not stop after SIGTERM; killing it", p.pid)
            # the Python backend stubs are in the server's process group: nothing of it may outlive stop()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            status = p.wait()
            log.info("tritonserver stopped (status %s)", status)
        if self.workspace is not None:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None
        return status

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait(self, poll: float = 0.5) -> None:
        """Block while the server runs (the CLI's foreground); a server that stops on its own is a
        :class:`ServerError` with the end of its log. Ctrl-C / SIGTERM in the caller unwind through ``stop()``."""
        while self.process is not None and self.process.poll() is None:
            time.sleep(poll)
        if self.process is not None:
            raise ServerError(f"tritonserver stopped on its own (status {self.process.returncode}):\n"
                              f"{self.log_errors()}")


@contextlib.contextmanager
def serving(artifact: str | os.PathLike, *, name: str = "diffc", instances: int = 1, max_batch: int | None = None,
            threads: int = 0, http_port: int = 8000, grpc_port: int = 8001, timeout: float = 120.0):
    """A Triton server on a repository generated for ``artifact`` (linked, not copied) in a temporary folder,
    removed with the server when the block ends (normally, on Ctrl-C, or on SIGTERM through the CLI)."""
    from diffc._fs import work_dir
    from diffc.serve.repository import write_repository

    with work_dir("diffc-serve") as work:
        repo = write_repository(artifact, work / "repository", name=name, instances=instances, max_batch=max_batch,
                                threads=threads, link=True)
        with TritonServer(repo, http_port=http_port, grpc_port=grpc_port, timeout=timeout) as server:
            yield server

