"""Errors about what the user gave us (config, data, paths, resources).

The CLI turns any `UserInputError` into a one-paragraph message and exit code 2, before any
model is loaded or Ray resource is taken where that is possible.
"""


class UserInputError(Exception):
    """Something the user supplied is wrong; the message names what, where, and what is allowed."""


class ConfigError(UserInputError):
    """A config key, type or value is not allowed."""


class DataError(UserInputError):
    """A data file or row is malformed."""


class ResourceError(UserInputError):
    """The cluster can never provide what a role asks for."""


class RunStopped(Exception):
    """The job was asked to stop (SIGTERM) and saved its state; the same command resumes it."""

    exit_code = 143  # 128 + SIGTERM, as a process killed by it would report


class RoleFailed(Exception):
    """A PPO role or a phase's Ray Train workers died or raised, and could not be recovered;
    the message names which."""
