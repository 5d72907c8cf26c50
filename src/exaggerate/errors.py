"""The base of every error that a user's input or a stage's file can cause: the command line
reports these as one line naming the file, key or value, never as a traceback."""


class ExaggerateError(Exception):
    """An input the tool refuses; the message says which and why."""
