"""Command line: ``spfmilter [-c FILE] {run,check-config,test}``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from . import config as configmod

if TYPE_CHECKING:
    from . import transaction

DEFAULT_CONFIG = "/etc/spfmilter.cfg"

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_STARTUP = 3


def _add_run_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--daemon", action="store_true", default=default,
                        help="detach from the terminal (SysV init); default: foreground")
    parser.add_argument("--stderr", action="store_true", default=default,
                        help="log to stderr whatever the config says")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spfmilter", description="SPF (RFC 7208) policy milter for Sendmail and Postfix.")
    parser.add_argument("--version", action="version", version=f"spfmilter {__version__}")
    parser.add_argument("-c", "--config", default=None,
                        help=f"config file (default $SPFMILTER_CONFIG or {DEFAULT_CONFIG})")
    _add_run_options(parser, False)  # run is the default command: its options work alone
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the milter (the default)")
    _add_run_options(run, argparse.SUPPRESS)  # given after run, or kept from before it
    sub.add_parser("check-config", help="validate the config and print the effective one")
    test = sub.add_parser("test", help="judge one client/HELO/sender as the milter would")
    test.add_argument("--ip", required=True, help="client IP address")
    test.add_argument("--helo", required=True, help="HELO/EHLO name")
    test.add_argument("--from", dest="sender", required=True,
                      help="MAIL FROM address ('' or '<>' for the null sender)")
    test.add_argument("--auth", action="store_true", help="as an SMTP-authenticated client")
    test.add_argument("--header-from", action="append", metavar="VALUE",
                      help="RFC 5322 From field value, for dmarc_defer (repeat for several)")
    test.add_argument("--json", action="store_true", help="print one JSON object")
    test.add_argument("--rcpt", action="append", default=[], metavar="ADDR",
                      help="RCPT TO address (repeatable): show what each recipient gets")
    test.add_argument("--trace", action="store_true",
                      help="also show each SPF evaluation step by step (with --json: \"trace\")")
    return parser


def _load(path: str, *, required: bool) -> configmod.Config:
    if not required and not os.path.exists(path):
        return configmod.loads("", filename="<defaults>")
    return configmod.load(path)


def cmd_check_config(path: str) -> int:
    cfg = configmod.load(path)
    for warning in configmod.warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(configmod.dump(cfg))
    print(f"# {path}: OK", file=sys.stderr)
    return EXIT_OK


def _reply_text(decision: object) -> str | None:
    code = getattr(decision, "code", None)
    if code is None:
        return None
    xcode = getattr(decision, "xcode", None)
    lines = list(getattr(decision, "reply_lines", ())) or [""]
    sep = [f"{code}-" for _ in lines[:-1]] + [f"{code} "]
    return "\r\n".join(f"{s}{xcode + ' ' if xcode else ''}{line}".rstrip()
                       for s, line in zip(sep, lines))


def cmd_test(path: str, args: argparse.Namespace, *, required: bool) -> int:
    from . import transaction
    from .daemon import make_checker

    cfg = _load(path, required=required)
    checker = make_checker(cfg)
    tracer = None
    if args.trace:
        from . import trace
        tracer = trace.start()
    args.ip = transaction.client_ip(args.ip)  # as the milter's connect takes it
    forwarder = None  # checked only where the milter would check it
    if not (args.auth and cfg.policy.skip_authenticated) and \
            transaction.client_skip(cfg, args.ip) is None:
        forwarder = transaction.forwarder_skip(cfg, checker, args.ip, args.helo)
    verdict = transaction.judge(cfg, checker, ip=args.ip, helo=args.helo, sender=args.sender,
                                authenticated=args.auth, skip=forwarder)
    if transaction.held(cfg, verdict):  # as the milter at end of headers
        verdict = transaction.review_dmarc(checker, verdict, args.header_from or [])
    d = verdict.decision
    reply = _reply_text(d)
    header_lines = [f"{name}: {value}" for name, value in verdict.header_fields]

    def result(r: object) -> dict[str, object] | None:
        if r is None:
            return None
        return {k: getattr(r, k) for k in ("identity", "result", "domain", "sender",
                                             "explanation", "comment", "checked")}

    rcpts = _recipients(cfg, verdict, args.rcpt)
    traced = {} if tracer is None else {"trace": tracer.as_json()}
    if args.json:
        print(json.dumps({**traced,
            "helo": result(verdict.helo), "mailfrom": result(verdict.mailfrom),
            "skip": verdict.skip, "helo_findings": list(verdict.helo_findings),
            "action": d.action, "would_action": d.would_action,
            "reason": d.reason, "reply": reply, "headers": header_lines,
            **({"recipients": rcpts} if args.rcpt else {}),
            "dmarc": None if verdict.dmarc is None else verdict.dmarc.policy,
            "deferred": verdict.deferred,
        }, ensure_ascii=True))
        return EXIT_OK
    if tracer is not None:
        print(tracer.text())
    for r in (verdict.helo, verdict.mailfrom):
        if r is not None:
            extra = f" ({r.comment})" if r.comment else ""
            print(f"{r.identity}: {r.result}{extra}")
            if r.explanation:
                print(f"  explanation: {r.explanation!r}")
    if verdict.skip:
        print(f"skipped: {verdict.skip}")
    if verdict.helo_findings:
        print(f"helo_finding: {', '.join(verdict.helo_findings)}")
    print(f"action: {d.action}" + (f" (would {d.would_action})"
                                   if d.would_action != d.action else ""))
    print(f"reason: {d.reason}")
    if verdict.dmarc is not None:
        where = verdict.dmarc.record_domain
        print(f"dmarc: {verdict.dmarc.policy}" + (f" (_dmarc.{where})" if where else "")
              + (", deferred=dmarc" if verdict.deferred else ""))
    if reply:
        print("reply:")
        for line in reply.split("\r\n"):
            print(f"  {line}")
    for r in rcpts:
        would = f" (would {r['would_action']})" if r["would_action"] != r["action"] else ""
        exempt = f" exempt={r['exempt']}" if r["exempt"] else ""
        print(f"rcpt {r['recipient']}: {r['action']}{would}{exempt}"
              + (f": {r['reply']}" if r["reply"] else ""))
    for line in header_lines:
        print(line)
    return EXIT_OK


def _recipients(cfg: configmod.Config, verdict: transaction.Verdict,
                rcpts: list[str]) -> list[dict[str, object]]:
    """Per-recipient decisions as the milter gives them at RCPT TO."""
    from . import recipients

    out = []
    for rcpt in rcpts:
        if cfg.policy.reject_at == "mail" or verdict.facts is None:
            decided = recipients.RecipientDecision(recipients.bare(rcpt), verdict.decision)
        else:
            decided = recipients.decide(verdict.facts, cfg.policy, rcpt, verdict.decision)
        out.append({"recipient": decided.recipient, "action": decided.action,
                    "would_action": decided.decision.would_action, "exempt": decided.exempt,
                    "reason": decided.decision.reason,
                    "reply": _reply_text(decided.decision)})
    return out


def cmd_run(path: str, args: argparse.Namespace) -> int:
    import libmilter_ext

    # First of all: a SIGHUP/SIGTERM/SIGINT during start-up waits for the
    # daemon's handlers (Daemon.run) instead of killing it.
    libmilter_ext.hold_signals()
    from .daemon import Daemon, StartupError

    cfg = configmod.load(path)
    try:
        return Daemon(path, cfg).run(detach=args.daemon, stderr=args.stderr)
    except StartupError as exc:
        logging.getLogger("spfmilter").error("cannot start: %s", exc)
        print(f"spfmilter: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spfmilter`` command."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command not in (None, "run") and (args.daemon or args.stderr):
        parser.error(f"--daemon and --stderr are options of run, not of {args.command}")
    explicit = args.config is not None or "SPFMILTER_CONFIG" in os.environ
    path = args.config if args.config is not None else \
        os.environ.get("SPFMILTER_CONFIG", DEFAULT_CONFIG)
    path = os.path.abspath(path)  # a reload after --daemon's chdir("/") reads the same file
    try:
        if args.command == "check-config":
            return cmd_check_config(path)
        if args.command == "test":
            return cmd_test(path, args, required=explicit)
        return cmd_run(path, args)
    except configmod.ConfigError as exc:
        print(f"spfmilter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"spfmilter: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
