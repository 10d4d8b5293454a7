"""The error every bad-input case raises, so the CLI can answer all of them with exit code 2.

Kept free of heavy imports: the CLI catches it without importing torch or transformers first."""


class InputError(Exception):
    """Bad input from the user (a file, a folder, an option); the message says what and where."""
