"""Command line: `p2p generate`, `p2p edit`, `p2p invert`, `p2p sweep`, `p2p attention`, `p2p eval`,
`p2p vocab`, `p2p download`, `p2p convert`.

    args.py      the parser, and the checks each flag gets as it is read
    checks.py    checks of the arguments together (config file, edit, size, words), before the model loads
    commands.py  what each command does

Errors a user can fix (a wrong path, a foreign checkpoint, a bad size: a `models.errors.UserError`) are
printed as one line, `p2p COMMAND: error: ...`, naming the problem and the fix, with exit status 2; Ctrl-C
stops with status 130 and leaves no half-written file; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import re
import sys

from models.errors import UserError

from . import commands
from .args import UsageError, build_parser


def one_line(e: BaseException) -> str:
    msg = e.args[0] if len(e.args) == 1 else str(e)  # (a KeyError's str() would quote it)
    return " ".join(str(msg).split())


NEGATIVE_LIST = re.compile(r"-\.?\d[\d.eE+-]*([,;]-?\.?\d[\d.eE+-]*)+")  # "-2,0,2": argparse takes it for a flag


def joined_negative_lists(argv: list[str]) -> list[str]:
    """["--values", "-2,0,2"] -> ["--values=-2,0,2"], so that a list starting with a negative number is read
    as the flag's value (argparse reads a lone negative number so, but not a list)."""
    out = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and NEGATIVE_LIST.fullmatch(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    parser = build_parser()
    prog = "p2p"
    try:
        try:
            args, extra = parser.parse_known_args(joined_negative_lists(sys.argv[1:] if argv is None else list(argv)))
        except SystemExit as e:  # --help
            return e.code
        prog = f"p2p {args.command}"
        if extra:
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        return commands.COMMANDS[args.command](args)
    except UsageError as e:
        print(f"{e.prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no file was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
