"""The one exception for mistakes a user can make, caught before training and reported in the user's words, and
whether the user asked for tracebacks instead."""

import os

# The command line sets HYDRA_FULL_ERROR=1 itself, so that Hydra raises its composition errors to normsweep, which
# says them in one line; the user's own HYDRA_FULL_ERROR is kept here, for normsweep and the jobs it starts.
USER_FULL_ERROR = "NORMSWEEP_FULL_ERROR"


class ConfigError(ValueError):
    """A mistake in the user's config or command line, explained in the user's words."""


def full_error() -> bool:
    """Whether the user asked for full tracebacks (HYDRA_FULL_ERROR=1)."""
    return os.environ.get(USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR")) == "1"
