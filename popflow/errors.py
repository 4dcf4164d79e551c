"""The one exception type popflow raises for bad input.

Every message names what is wrong and where (a config key, a file:line, a row), so the CLI can print it
as-is and exit non-zero. Anything else escaping a stage is a bug, and keeps its traceback.
"""


class PopflowError(Exception):
    """Bad input or configuration: the message is meant for the user, no traceback needed."""
