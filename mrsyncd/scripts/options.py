"""Command-line option parsing shared by mrsyncd's commands."""

from __future__ import annotations

import getopt
import sys
from collections.abc import Sequence
from typing import NoReturn

from twisted.python import usage

from mrsyncd import __version__

#: A usage error's exit status, for every command.
EXIT_USAGE = 2


class CommandOptions(usage.Options):
    """
    Options of a mrsyncd command or subcommand.  ``usage.Options`` answers
    ``--version`` with Twisted's version; ours is mrsyncd's, on every
    subcommand too.
    """

    def opt_version(self) -> NoReturn:
        """Display mrsyncd's version and exit."""
        print(f"mrsyncd {__version__}")
        raise SystemExit(0)


def usage_error(program: str, options: usage.Options, error: Exception) -> NoReturn:
    """
    One line saying what is wrong and where the help is (not the whole
    help, which scrolled the error away), and exit with `EXIT_USAGE`.
    """
    sub = getattr(options, "subCommand", None)
    command = f"{program} {sub}" if sub else program
    sys.stderr.write(f"{program}: {error} (see {command} --help)\n")
    raise SystemExit(EXIT_USAGE)


class InterspersedOptions(CommandOptions):
    """
    Options that may come before, between or after the positional arguments.

    ``usage.Options`` parses with ``getopt.getopt``, which stops at the first
    positional argument, so ``issue DIR --role node NAME`` would fail.  This
    reorders the arguments GNU-style first (options, then ``--``, then the
    positional arguments) and lets ``usage.Options`` do the rest.
    """

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        try:
            opts, args = getopt.gnu_getopt(argv, self.shortOpt, self.longOpt)  # type: ignore[attr-defined]
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from None
        tokens = [f"{opt}={value}" if opt.startswith("--") and value else opt + value for opt, value in opts]
        super().parseOptions([*tokens, "--", *args])
