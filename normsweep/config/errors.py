"""The one exception for mistakes a user can make, caught before training and reported in the user's words."""


class ConfigError(ValueError):
    """A mistake in the user's config or command line, explained in the user's words."""
