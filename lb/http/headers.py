"""One check of a whole header list before h11 writes it.

h11 validates every header of every event it sends, four Python calls and two regular
expressions per header; on the proxy's path that is the node's headers (which h11's own parser
already validated), lb's own tags and the client's headers going on to the node: about a
twentieth of a proxied request's CPU. `sendable` makes the same safety check for the whole list in
two passes of C (names are tokens; no value holds a control character, so nothing can split a
header or a response), and the caller then builds the event with h11's `_parsed=True`, which
skips only that per-header validation (h11 still lowercases names and checks Content-Length and
Transfer-Encoding). A list that fails goes to h11 unchanged, which raises its precise error.
"""

from __future__ import annotations

import re

from lb.http.types import Headers

# RFC 9110 §5.6.2: a token; names joined by one space (which no token holds).
_NAMES = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+(?: [-!#$%&'*+.^_`|~0-9A-Za-z]+)*")
# Control characters but HTAB (RFC 9110 §5.5): CR, LF and NUL among them. (Stricter than
# h11, which lets DEL and most other controls through: those lists go to h11's own check.)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def sendable(headers: Headers) -> bool:
    """True when every name is a token and no value holds a control character."""
    if not headers:
        return True
    names = b" ".join([name for name, _ in headers])
    values = b" ".join([value for _, value in headers])
    return (
        _NAMES.fullmatch(names) is not None
        and names.count(b" ") == len(headers) - 1  # no name held a space of its own
        and _CONTROL.search(values) is None
    )
