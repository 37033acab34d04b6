"""User-facing errors: one line, exit code 2 (see cli.py)."""


class PolyftError(Exception):
    """A user mistake: bad config, missing file, offline hub access. Carries one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(PolyftError):
    """A config key or value that is not allowed."""


class MissingArtifactError(PolyftError):
    """A stage needs a product that no earlier stage has made yet."""
