"""Error types. A `UserError` is reported by the CLI as one line, without a traceback."""

import re


class UserError(Exception):
    """Bad input from the user (a profile value, a missing file, an unknown state...).

    ``transient``: False for bad input (a stage records it as ``rejected``: deterministic, not
    retried while the inputs are unchanged); True where the machine or the network, not the input,
    is at fault (a full disk, a download that kept failing): still one line for the CLI, but a
    stage records it as ``failed`` and the next run tries again.
    """

    transient: bool = False


def is_rejection(err: BaseException) -> bool:
    """Should a stage record `err` as ``rejected`` (deterministic) rather than ``failed``?"""
    return isinstance(err, UserError) and not getattr(err, "transient", False)


_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/@'\"]+@")
_URL_QUERY = re.compile(r"\?(?=[^\s'\"]*=)[^\s'\"]*")


def redact(text: object) -> str:
    """`text` with credentials a URL may carry removed: ``user:password@`` and query strings
    (SAS tokens, ``?token=``, ``?subscription-key=``) become ``<redacted>``. For anything that is
    printed, logged or recorded (ledger reasons, catalog metadata)."""
    s = _URL_USERINFO.sub(r"\1<redacted>@", str(text))
    return _URL_QUERY.sub("?<redacted>", s)
