"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, model path, output dir) that they can fix."""
