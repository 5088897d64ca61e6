"""Errors a user can fix, as opposed to bugs.

A `UserError` is raised for a problem the person running the code can fix (a wrong path, a foreign
checkpoint, a bad size, a word that is not in the prompt); its message names the problem and the fix.
The `p2p` command prints it as one line and exits with status 2; any other exception is a bug and keeps
its traceback. Every class here subclasses the built-in error callers already expect, so code (and
tests) that catch ValueError, FileNotFoundError or KeyError keep working.

models/ does not import p2p/; p2p/ imports these from here.
"""
from __future__ import annotations

import tomllib
from pathlib import Path


class UserError(ValueError):
    """A problem the user can fix; the message says what is wrong and what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (also a FileNotFoundError)."""


class UnknownNameError(UserError, KeyError):
    """A name (model preset, family, ...) that is not known (also a KeyError)."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


def read_toml(path: str | Path, what: str) -> dict:
    """A user's TOML file as a dict; a missing or malformed file is a UserError naming it (`what`: "edit
    settings file", "experiment file", ...)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise MissingFileError(f"no {what} at {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
