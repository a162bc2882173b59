"""The collector's schedule in a serving-only process (``trainstream.gcpolicy``)."""

from __future__ import annotations

import gc
import subprocess
import sys

from twisted.trial.unittest import TestCase

from trainstream import gcpolicy


class TuneTests(TestCase):
    def setUp(self) -> None:
        saved = gc.get_threshold()

        def restore() -> None:
            gc.unfreeze()
            gc.set_threshold(*saved)

        self.addCleanup(restore)

    def test_raises_the_defaults(self) -> None:
        """From CPython's defaults, collections are spaced out to THRESHOLDS."""
        gc.set_threshold(700, 10, 10)
        gcpolicy.tune()
        self.assertEqual(gc.get_threshold(), gcpolicy.THRESHOLDS)

    def test_keeps_what_is_higher(self) -> None:
        """A process that asked for fewer collections keeps its own figure."""
        gc.set_threshold(50_000, 5, 100)
        gcpolicy.tune()
        self.assertEqual(gc.get_threshold(), (50_000, 20, 100))

    def test_freezes_what_exists(self) -> None:
        """Objects alive at the call are moved out of every generation's walk."""
        gc.unfreeze()
        gcpolicy.tune()
        self.assertGreater(gc.get_freeze_count(), 0)


class ProcessTests(TestCase):
    def test_twistd_service_tunes(self) -> None:
        """
        twistd's ``makeService`` calls it (in a child interpreter, so this
        one's collector is left alone).
        """
        code = (
            "import gc\n"
            "from trainstream.tap import Options, makeService\n"
            "o = Options()\n"
            "o.parseOptions(['--memory', '--sse', 'tcp:0:interface=127.0.0.1',"
            " '--ws', 'tcp:0:interface=127.0.0.1', '--rest', 'tcp:0:interface=127.0.0.1'])\n"
            "makeService(o)\n"
            "print(gc.get_threshold())\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip().splitlines()[-1], str(gcpolicy.THRESHOLDS))
