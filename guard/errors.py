"""Domain exceptions of hallucination-guard.

Every error a library user or the HTTP layer can see is one of these. Messages say
what was wrong and how to fix it; the API maps each class to one HTTP status in one
handler (`guard.api`).
"""


class GuardError(Exception):
    """Base class of every hallucination-guard error."""


class ModelLoadError(GuardError):
    """The model spec could not be resolved or loaded (missing package, file or id)."""


class UnsupportedArchitectureError(GuardError):
    """No MLP down-projection layers were found where the known architectures keep them."""


class ProbeError(GuardError):
    """A probe artifact is missing, malformed, tampered with or for another model."""


class ProbeIntegrityError(ProbeError):
    """A file's sha256 does not match the manifest, or the manifest does not match a pin."""


class ProbeModelMismatchError(ProbeError):
    """The probe was trained on a model whose fingerprint differs from the loaded one."""


class CaptureError(GuardError):
    """Neuron capture was misused (bad layer/neuron indices, overlapping captures)."""


class InvalidRequestError(GuardError):
    """A request the guard cannot serve as asked (too long, bad parameters)."""


class OverloadedError(GuardError):
    """The request queue is full; retry after a short wait."""


class ShuttingDownError(GuardError):
    """The server is draining and accepts no new requests."""
