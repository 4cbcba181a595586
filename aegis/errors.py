"""Typed errors: each reaches the user as one clear line and an exit code."""


class AegisError(Exception):
    """Base class. `exit_code` 1: a runtime failure."""

    exit_code = 1


class UsageError(AegisError):
    """Bad flags or arguments (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid config file or flag value (exit 2)."""


class SiteError(UsageError):
    """An invalid or unknown site profile (exit 2)."""


class PlacementError(UsageError):
    """The requested instances cannot be placed on the site's nodes (exit 2)."""


class SchedulerError(AegisError):
    """The scheduler refused or failed a command (exit 1)."""


class StageError(AegisError):
    """Staging weights to node-local storage failed (exit 1)."""


class VllmSetupError(AegisError):
    """Installing the CPU build of vLLM or writing the tiny test model failed (exit 1)."""
