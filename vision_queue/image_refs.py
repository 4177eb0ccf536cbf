"""What an image given as a string is: the one parser every route and both clients use.

A string is exactly one of:

* a `data:` URI (any case: `DATA:image/png;base64,...`), decoded, never opened;
* an `http` or `https` URL (any case: `HTTPS://...`), checked by the address rules and
  fetched by a worker;
* a local path, read by the trusted local client only. A server (the gateway) calls with
  `allow_path=False`, so a string that is neither of the above is refused, and nothing a
  remote caller sends is ever opened as a file.

Anything else that names a scheme (`file://`, `ftp://`, `javascript:`...) is refused. The
decision is made on the string as given: no stripping, so `" data:..."` is not a data URI
and, from a remote caller, is refused rather than read.
"""

from __future__ import annotations

import re
from enum import Enum

from vision_queue.errors import InvalidInput

# RFC 3986 scheme, then "//": what makes a string a URL of some scheme rather than a path.
_SCHEMED = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}://")
_URL_SCHEMES = ("http", "https")


class RefKind(str, Enum):
    DATA = "data"
    URL = "url"
    PATH = "path"


def ref_kind(text: str, field: str, *, allow_path: bool) -> RefKind:
    """The kind of image reference `text` is; InvalidInput naming `field` when refused."""
    if text[:5].lower() == "data:":
        return RefKind.DATA
    scheme = _SCHEMED.match(text)
    if scheme is not None:
        name = scheme.group(0)[:-3].lower()
        if name in _URL_SCHEMES:
            return RefKind.URL
        raise InvalidInput(
            f"only http(s) URLs and data: URIs are accepted, not {name[:16]}:", field=field
        )
    if not allow_path:
        raise InvalidInput(
            "an image here is an http(s) URL or a data:image/...;base64, URI", field=field
        )
    return RefKind.PATH
