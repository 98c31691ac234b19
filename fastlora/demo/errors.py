"""The demo's user errors: raised for bad options or an unusable environment, printed by the command line
as one message with a non-zero exit status (no traceback)."""


class DemoError(Exception):
    """A problem the user can fix (the message says how)."""
