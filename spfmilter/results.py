"""The SPF result of one checked identity, shared by checker, policy and headers."""

from __future__ import annotations

from dataclasses import dataclass

#: Every result RFC 7208 section 2.6 defines, in the spelling used throughout.
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")

#: The two identities RFC 7208 checks (sections 2.3 and 2.4).
IDENTITIES = ("helo", "mailfrom")


@dataclass(frozen=True)
class SpfResult:
    """Outcome of checking one identity (HELO or MAIL FROM) of an SMTP session.

    ``explanation`` and ``comment`` may carry text chosen by the sender's DNS
    administrator: treat them as untrusted wherever they are written out.
    """

    identity: str  # "helo" or "mailfrom"
    result: str  # one of RESULTS
    domain: str = ""  # domain checked ("" when not checked)
    sender: str = ""  # address checked (postmaster@helo for helo / null sender)
    explanation: str = ""  # the domain's exp= text (fail only), untrusted, raw
    comment: str = ""  # short human text on how the result came about
    checked: bool = True  # False when the identity could not be checked

    def __post_init__(self) -> None:
        if self.identity not in IDENTITIES:
            raise ValueError(f"unknown SPF identity {self.identity!r}")
        if self.result not in RESULTS:
            raise ValueError(f"unknown SPF result {self.result!r}")
