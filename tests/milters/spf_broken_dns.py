"""Run the real spfmilter daemon with an SPF checker (and AR parser) that raise, for on_error
(a TXT lookup of a name with "boom" in it raises too, for dmarc_defer).

Usage: spf_broken_dns.py CONFIG
"""

import sys

from spfmilter import config, daemon, milter
from spfmilter.spfcheck import SpfChecker


class ExplodingChecker(SpfChecker):
    def check_mailfrom(self, ip, sender, helo, receiver=""):
        if "boom" in sender:
            raise RuntimeError("checker exploded")
        return super().check_mailfrom(ip, sender, helo, receiver)

    def lookup_txt(self, name):
        if "boom" in name:
            raise RuntimeError("TXT lookup exploded")
        return super().lookup_txt(name)


REAL_HEADERS = milter.headers


def exploding_is_own_authres(value, authserv_id):
    if "explode" in value:
        raise RuntimeError("header parser exploded")
    return REAL_HEADERS.is_own_authres(value, authserv_id)


class ExplodingHeaders:
    """spfmilter.headers, but judging an Authentication-Results field with
    "explode" in it raises (an error in the no-reply header stage)."""

    def __getattr__(self, name):
        if name == "is_own_authres":
            return exploding_is_own_authres
        return getattr(REAL_HEADERS, name)


milter.headers = ExplodingHeaders()
daemon.make_checker = lambda cfg: ExplodingChecker(
    nameservers=cfg.spf.nameservers, lookup_timeout=cfg.spf.lookup_timeout)

if __name__ == "__main__":
    path = sys.argv[1]
    sys.exit(daemon.Daemon(path, config.load(path)).run(stderr=True))
