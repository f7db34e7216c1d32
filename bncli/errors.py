"""One exception family for every expected failure.

The CLI turns a :class:`BncliError` into one red line on stderr plus its hint and
exits with :attr:`BncliError.exit_code`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BncliError(Exception):
    """Base class: an expected failure with a message and a concrete fix."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InputError(BncliError):
    """A file is missing, unreadable or in a format bncli does not read."""


class UnsafeFileError(InputError):
    """A file would need pickle (arbitrary code) to load, so it is refused."""


class KeyChoiceError(InputError):
    """A container holds several tensors (or not the one asked for)."""


class ShapeError(BncliError):
    """A tensor is not a valid BatchNorm2d input (rank, channels, batch size)."""


class DTypeError(BncliError):
    """A tensor's dtype cannot be normalized as it is (integers, bool, complex)."""


class StateError(BncliError):
    """A state_dict / checkpoint does not fit the data or holds no such layer."""


class OutputError(BncliError):
    """The output cannot be written (exists, is the input, unknown extension)."""


class DeviceError(BncliError):
    """The requested device is not available on this machine."""
