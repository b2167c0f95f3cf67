"""Typed errors. Every message says what went wrong *and* what to do about it.

All errors raised on purpose by diffc derive from :class:`DiffcError`, so callers (the CLI, the C API,
an app embedding the runtime) can catch one type and show ``str(err)`` to a person.
"""

from __future__ import annotations


class DiffcError(Exception):
    """Base class of every error diffc raises on purpose."""

    #: stable machine-readable code (also returned by the C API)
    code = "diffc_error"


class ModelError(DiffcError):
    """The source model folder is missing, incomplete or of an unsupported kind."""

    code = "model_error"


class MissingComponentError(ModelError):
    code = "missing_component"


class UnsupportedPipelineError(ModelError):
    code = "unsupported_pipeline"


class OutputExistsError(DiffcError):
    """The output path exists (and ``--force`` was not given, or it is not something diffc may replace)."""

    code = "output_exists"


class OutputPathError(DiffcError):
    """The output path cannot be written (read-only, under a file, not a valid folder name)."""

    code = "output_path"


class ExportError(DiffcError):
    """Exporting a component to ONNX failed."""

    code = "export_error"


class ParityError(ExportError):
    """An exported graph does not match PyTorch within the component's tolerance."""

    code = "parity_error"


class ShapeError(ExportError):
    """An exported graph produced an output of the wrong shape."""

    code = "shape_error"


class ProfileError(DiffcError):
    """A profile is missing or one of its fields is invalid (the message names the field)."""

    code = "profile_error"


class PassOptionError(ProfileError):
    """A pass option (the profile's ``[passes]`` table, or a keyword of ``run_passes``) is invalid."""

    code = "pass_option_error"


class PassError(DiffcError):
    """A graph pass produced an invalid graph, or the graph holds ops the target cannot run."""

    code = "pass_error"


class BackendUnavailableError(DiffcError):
    """The profile's backend is not installed, or cannot run the requested precision on this machine."""

    code = "backend_unavailable"


class EngineBuildError(DiffcError):
    """A backend could not parse or build a component's graph (the message carries the backend's own errors)."""

    code = "engine_build_error"


class DiskSpaceError(DiffcError):
    """Not enough free disk for a build's work files or its artifact."""

    code = "disk_space"


class MemoryBudgetError(DiffcError):
    """A build's estimated peak memory is more than the machine has available (checked before exporting)."""

    code = "memory_budget"


class QualityGateError(DiffcError):
    """A quantized artifact's images differ from the fp32 artifact's by more than the profile allows."""

    code = "quality_gate_error"


class CudaError(DiffcError):
    """A CUDA runtime call failed while running a GPU engine."""

    code = "cuda_error"


class ArtifactError(DiffcError):
    """An artifact is missing, corrupt, tampered with, or from an incompatible diffc."""

    code = "artifact_error"


class ManifestError(ArtifactError):
    code = "manifest_error"


class IntegrityError(ArtifactError):
    code = "integrity_error"


class InputError(DiffcError):
    """A generation request is outside what the artifact was built for (size, guidance ...)."""

    code = "input_error"
