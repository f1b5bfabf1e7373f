"""The arguments of `logs`, `policy suggest` and `policy replay` (the commands are in
logcli.py). Apart, so that every other command (`run` first) does not import the log
reader just to build its parser (~30 ms).
"""

from __future__ import annotations

from collections.abc import Callable

FOLLOW_TAIL = 10  # records shown before following, without --since or --lines


def _lazy(name: str) -> Callable:
    def run(args):
        from . import logcli

        return getattr(logcli, name)(args)

    return run


def add_parsers(sub, policy_sub, common: Callable[..., None]) -> None:
    """Add `logs` to `sub` and `suggest`/`replay` to `policy_sub` (cli.build_parser)."""
    lg = sub.add_parser("logs", help="show the request log of an instance")
    common(lg, config=False)
    lg.add_argument("name", nargs="?", metavar="NAME",
                    help="the instance (default: every instance with a log)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep showing new records")
    lg.add_argument("--blocked", action="store_true",
                    help="only what did not get through (denied, failed, tripwires)")
    lg.add_argument("--host", metavar="PATTERN",
                    help="only this host; *.example.com for it and every name under it")
    lg.add_argument("--since", metavar="TIME",
                    help="only records from TIME on: 15m, 2h, 7d, today, 2024-05-01 14:00")
    lg.add_argument("-n", "--lines", type=int, metavar="N",
                    help=f"only the last N records (with --follow: {FOLLOW_TAIL})")
    lg.add_argument("--json", action="store_true", help="JSON lines, one record each")
    lg.add_argument("--file", action="append", default=[], metavar="FILE",
                    help="read FILE (and its rotated files FILE.1, ...) instead")
    lg.set_defaults(func=_lazy("cmd_logs"))

    sg = policy_sub.add_parser("suggest",
                               help="an allow list for the config, from what an agent did")
    common(sg, config=False)
    sg.add_argument("name", nargs="?", metavar="NAME", help="the instance whose log to read")
    sg.add_argument("--from", dest="files", nargs="+", default=[], metavar="FILE",
                    help="read these logs instead (rotated files of each are included)")
    sg.add_argument("--since", metavar="TIME", help="only records from TIME on")
    sg.add_argument("--min-group", type=int, default=2, metavar="N",
                    help="group names under *.DOMAIN from N names seen on (default 2)")
    sg.set_defaults(func=_lazy("cmd_suggest"))

    rp = policy_sub.add_parser("replay", help="what a candidate config would have blocked")
    common(rp, config=False)
    rp.add_argument("name", nargs="?", metavar="NAME",
                    help="the instance whose log to read; also the [agents.NAME] judged")
    rp.add_argument("--config", required=True, metavar="CANDIDATE",
                    help="the candidate config file")
    rp.add_argument("--agent", metavar="AGENT",
                    help="judge with [agents.AGENT] of the candidate (default: NAME if the "
                    "candidate has it, else [defaults])")
    rp.add_argument("--from", dest="files", nargs="+", default=[], metavar="FILE",
                    help="read these logs instead (rotated files of each are included)")
    rp.add_argument("--since", metavar="TIME", help="only records from TIME on")
    rp.set_defaults(func=_lazy("cmd_replay"))
