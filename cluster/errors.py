"""Errors that cross from the engine to the servers (no torch: the Ingress imports this)."""


class DataPlaneError(RuntimeError):
    """A data-plane actor died or a step outlived the collective timeout; the instance must be restarted."""
