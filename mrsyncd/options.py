"""Command-line option parsing shared by mrsyncd's commands."""

from __future__ import annotations

import getopt
import sys
from collections.abc import Sequence

from twisted.python import usage


class InterspersedOptions(usage.Options):
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
