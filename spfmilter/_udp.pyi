"""Type stubs for the C helper spfmilter._udp (spfmilter/_udp.c)."""

def exchange(fd: int, wire: bytes | None, timeout: float, /) -> bytes:
    """Send *wire* (None: no send) on a connected blocking socket, wait at most
    *timeout* seconds for a datagram and return it; one GIL release."""

def stats() -> tuple[int, int]:
    """(exchange() calls so far, the GIL releases they made)."""
