"""Run the real spfmilter daemon with an SPF checker that raises, to test on_error.

Usage: spf_broken_dns.py CONFIG
"""

import sys

from spfmilter import config, daemon
from spfmilter.spfcheck import SpfChecker


class ExplodingChecker(SpfChecker):
    def check_mailfrom(self, ip, sender, helo, receiver=""):
        if "boom" in sender:
            raise RuntimeError("checker exploded")
        return super().check_mailfrom(ip, sender, helo, receiver)


daemon.make_checker = lambda cfg: ExplodingChecker(
    nameservers=cfg.spf.nameservers, lookup_timeout=cfg.spf.lookup_timeout)

if __name__ == "__main__":
    path = sys.argv[1]
    sys.exit(daemon.Daemon(path, config.load(path)).run(stderr=True))
