"""spfmilter: an SPF (RFC 7208) policy milter for Sendmail and Postfix."""

from ._version import __version__

__all__ = ["__version__"]
