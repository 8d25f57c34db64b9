"""User errors: mistakes the user can fix, printed by the command-line tools as one line."""


class UserError(Exception):
    """A mistake in the user's input (config, flags, files, environment).

    Its message names the value and the fix, so the command-line tools print it as one line with
    no traceback. Anything that is not a `UserError` is a bug and keeps its traceback.
    """


class ConfigError(UserError, ValueError):
    """A config field (or a flag) has a value that cannot work; the message names field and fix."""
