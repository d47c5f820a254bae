"""
A node's post-receive hook (`mrsyncd.engine.hook`), run for real: the changed
paths NUL-separated, a time limit, and only the end of its output kept.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mrsyncd.engine.hook import HOOK_OUTPUT, run_hook


class HookTests(unittest.TestCase):
    timeout = 30

    def run_hook(self, script: str, changed: list[str] = (), timeout: float = 10.0) -> defer.Deferred:  # type: ignore[assignment]
        return run_hook(reactor, ["/bin/sh", "-c", script], changed, {"MRSYNC_JOB": "7"}, timeout)

    @defer.inlineCallbacks
    def test_changed_paths_arrive_nul_separated_whatever_their_names(self) -> Any:
        # Not trial's mktemp, which makes its directory beneath the working directory.
        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch)
        out = Path(scratch) / "changed"
        names = ["plain", "with\nnewline", "späce and\ttab", "d/e/f"]
        hook = yield self.run_hook(f'cp "$MRSYNC_CHANGED" {out}; test "$MRSYNC_JOB" = 7', names)
        self.assertEqual(hook["status"], 0, hook)
        self.assertEqual(out.read_bytes().split(b"\0"), [n.encode() for n in names] + [b""])

    @defer.inlineCallbacks
    def test_a_hook_past_its_time_is_stopped_and_says_so(self) -> Any:
        started = reactor.seconds()
        hook = yield self.run_hook("echo begun; sleep 20", timeout=0.5)
        self.assertLess(reactor.seconds() - started, 5)
        self.assertLess(hook["status"], 0, hook)  # ended by a signal
        self.assertIn("begun", hook["output"])
        self.assertIn("still running after 0.5 s", hook["output"])

    @defer.inlineCallbacks
    def test_a_hook_that_ignores_sigterm_is_killed(self) -> Any:
        self.patch(__import__("mrsyncd.engine.hook", fromlist=["KILL_AFTER"]), "KILL_AFTER", 0.5)
        hook = yield self.run_hook("trap '' TERM; sleep 20", timeout=0.3)
        self.assertEqual(hook["status"], -9, hook)

    @defer.inlineCallbacks
    def test_only_the_end_of_a_flood_of_output_is_kept(self) -> Any:
        # A word on stderr, 8 MiB on stdout, then a last word there.
        hook = yield self.run_hook("echo first >&2; head -c 8388608 /dev/zero; echo the end; exit 2")
        self.assertEqual(hook["status"], 2)
        self.assertLessEqual(len(hook["output"].encode()), HOOK_OUTPUT)
        self.assertTrue(hook["output"].endswith("the end\n"), hook["output"][-40:])

    @defer.inlineCallbacks
    def test_a_hook_that_cannot_start_fails(self) -> Any:
        hook = yield run_hook(reactor, ["/nonexistent/hook"], ["f"], {}, 5.0)
        self.assertNotEqual(hook["status"], 0, hook)
