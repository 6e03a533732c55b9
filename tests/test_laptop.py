"""The laptop: ``piccolo3``'s global options, wherever they are written."""

import io

from .helpers import ServerTestCase
from .test_wire import coro


async def piccolo3(*argv):
    from piccolo_twisted.cli.main import run
    out, err = io.StringIO(), io.StringIO()
    code = await run(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


class GlobalOptionsTests(ServerTestCase):
    """``--server`` and ``--timeout`` before or after the command (issue 21:
    ``piccolo3 status --server URL`` gave "unrecognized arguments")."""

    @coro
    async def test_server_after_the_command(self):
        code, out, err = await piccolo3("status", "--server", self.base)
        self.assertEqual(code, 0, err)
        self.assertIn("idle", out)
        code, out, err = await piccolo3("jobs", "--timeout", "5", "--server", self.base)
        self.assertEqual(code, 0, err)

    @coro
    async def test_before_still_works_and_after_wins(self):
        code, out, err = await piccolo3("--server", self.base, "health")
        self.assertEqual(code, 0, err)
        # given twice: the one after the command is the one used
        code, out, err = await piccolo3("--server", "coap://[::1]:9", "status",
                                        "--server", self.base)
        self.assertEqual(code, 0, err)
        # a bad value after the command is a usage error like before it
        code, out, err = await piccolo3("status", "--timeout", "-1")
        self.assertEqual(code, 2)

    def test_defaults_untouched_by_the_command(self):
        from piccolo_twisted.cli.main import build_parser
        args = build_parser().parse_args(["--server", "coap://a", "--timeout", "7", "jobs"])
        self.assertEqual((args.server, args.timeout), ("coap://a", 7.0))
