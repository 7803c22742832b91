"""Wire constants of the milter protocol, version 6.

Values follow Sendmail's ``include/libmilter/mfdef.h`` and ``mfapi.h``.
Command and reply codes are one-byte ``bytes`` (as they travel on the wire);
flags and macro stage indices are ``int``.  Nothing here needs the C module,
so MTA-side tools (``libmilter_ext.testing``) can use it on their own.
"""
from __future__ import annotations

#: Protocol version spoken by libmilter 8.14 and later.
SMFI_PROT_VERSION = 6

#: Bytes in a packet's big-endian length field.
MILTER_LEN_BYTES = 4
#: Bytes of the three 32-bit words that open an option negotiation packet.
MILTER_OPTLEN = 3 * MILTER_LEN_BYTES
#: Largest body chunk an MTA sends in one SMFIC_BODY packet.
MILTER_CHUNK_SIZE = 65535
#: Default limit on a packet's data (without the command byte).
MILTER_MAX_DATA_SIZE = 65535

# Address families in an SMFIC_CONNECT packet.
SMFIA_UNKNOWN = b"U"
SMFIA_UNIX = b"L"
SMFIA_INET = b"4"
SMFIA_INET6 = b"6"

# Commands, MTA -> milter.
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Replies, milter -> MTA.
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# Actions a milter may take (smfiDesc.xxfi_flags, negotiated in SMFIC_OPTNEG).
SMFIF_NONE = 0x0000
SMFIF_ADDHDRS = 0x0001
SMFIF_CHGBODY = 0x0002
SMFIF_MODBODY = SMFIF_CHGBODY
SMFIF_ADDRCPT = 0x0004
SMFIF_DELRCPT = 0x0008
SMFIF_CHGHDRS = 0x0010
SMFIF_QUARANTINE = 0x0020
SMFIF_CHGFROM = 0x0040
SMFIF_ADDRCPT_PAR = 0x0080
SMFIF_SETSYMLIST = 0x0100

SMFI_V1_ACTS = 0x000F
SMFI_V2_ACTS = 0x003F
#: Every action flag protocol version 6 defines.
SMFI_CURR_ACTS = 0x01FF

# Protocol flags: stages not to send, stages without reply, extra features.
SMFIP_NOCONNECT = 0x00000001
SMFIP_NOHELO = 0x00000002
SMFIP_NOMAIL = 0x00000004
SMFIP_NORCPT = 0x00000008
SMFIP_NOBODY = 0x00000010
SMFIP_NOHDRS = 0x00000020
SMFIP_NOEOH = 0x00000040
SMFIP_NR_HDR = 0x00000080
SMFIP_NOHREPL = SMFIP_NR_HDR
SMFIP_NOUNKNOWN = 0x00000100
SMFIP_NODATA = 0x00000200
SMFIP_SKIP = 0x00000400
SMFIP_RCPT_REJ = 0x00000800
SMFIP_NR_CONN = 0x00001000
SMFIP_NR_HELO = 0x00002000
SMFIP_NR_MAIL = 0x00004000
SMFIP_NR_RCPT = 0x00008000
SMFIP_NR_DATA = 0x00010000
SMFIP_NR_UNKN = 0x00020000
SMFIP_NR_EOH = 0x00040000
SMFIP_NR_BODY = 0x00080000
SMFIP_HDR_LEADSPC = 0x00100000
SMFIP_MDS_256K = 0x10000000
SMFIP_MDS_1M = 0x20000000

SMFI_V1_PROT = 0x0000003F
SMFI_V2_PROT = 0x0000007F
#: Every protocol flag an MTA can offer in version 6 (all NO*, NR_*, SKIP,
#: RCPT_REJ and HDR_LEADSPC); the MDS_* data size bits are not included.
SMFI_CURR_PROT = 0x001FFFFF
#: Bits libmilter reserves for itself (the MDS_* sizes).
SMFI_INTERNAL = 0x70000000

# Macro stages: the index a milter passes to smfi_setsymlist().
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6

#: Macro stage index -> the command whose SMFIC_MACRO packet carries it.
SMFIM_COMMANDS: dict[int, bytes] = {
    SMFIM_CONNECT: SMFIC_CONNECT,
    SMFIM_HELO: SMFIC_HELO,
    SMFIM_ENVFROM: SMFIC_MAIL,
    SMFIM_ENVRCPT: SMFIC_RCPT,
    SMFIM_DATA: SMFIC_DATA,
    SMFIM_EOM: SMFIC_BODYEOB,
    SMFIM_EOH: SMFIC_EOH,
}


def flag_names(value: int, prefix: str) -> list[str]:
    """Name the bits of ``value`` using this module's ``prefix`` constants.

    ``flag_names(0x3, "SMFIP_")`` gives ``["SMFIP_NOCONNECT", "SMFIP_NOHELO"]``;
    bits without a name come out as hex.  Meant for log and error messages.
    """
    names = []
    rest = value
    for bit in range(32):
        mask = 1 << bit
        if not value & mask:
            continue
        for name, known in _FLAG_TABLE.get(prefix, ()):
            if known == mask:
                names.append(name)
                rest &= ~mask
                break
    if rest:
        names.append(hex(rest))
    return names


def _flag_table(prefix: str) -> tuple[tuple[str, int], ...]:
    aliases = {"SMFIF_MODBODY", "SMFIP_NOHREPL"}
    return tuple(
        (name, value)
        for name, value in globals().items()
        if name.startswith(prefix) and isinstance(value, int) and name not in aliases
        and value and value & (value - 1) == 0
    )


_FLAG_TABLE = {prefix: _flag_table(prefix) for prefix in ("SMFIF_", "SMFIP_")}
