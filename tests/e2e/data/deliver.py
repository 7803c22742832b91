"""Local mailer of the e2e Sendmail: one file per message in a directory.

Usage: deliver.py DIR RECIPIENT.  Writes the message read from stdin to
DIR/<time>.<pid>.<recipient>.eml via a temporary name, so a reader never
sees half a message.
"""

import os
import sys
import time


def main() -> int:
    directory, recipient = sys.argv[1], sys.argv[2]
    data = sys.stdin.buffer.read()
    name = f"{time.time_ns()}.{os.getpid()}.{recipient.replace('/', '_')}.eml"
    tmp = os.path.join(directory, "." + name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.rename(tmp, os.path.join(directory, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
