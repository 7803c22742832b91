"""A MessageMilter with SMFIP_HDR_LEADSPC: reports the raw header block it spooled.

Usage: leadspc_message.py SOCKET_SPEC [leadspc|plain]
"""

import sys

import libmilter_ext as lm
from libmilter_ext.message import MessageMilter


class RawHeaders(MessageMilter):
    protocol = lm.SMFIP_HDR_LEADSPC if sys.argv[2:] == ["leadspc"] else 0

    def message(self, msg):
        head = self.raw().read().split(b"\r\n\r\n", 1)[0]
        for i, line in enumerate(head.split(b"\r\n")):
            self.addheader(f"X-Raw-{i}", line.hex())
        self.addheader("X-Subject", str(msg["Subject"]))
        return lm.CONTINUE


if __name__ == "__main__":
    lm.run(RawHeaders, sys.argv[1], "rawheaders", timeout=30)
