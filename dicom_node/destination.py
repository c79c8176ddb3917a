"""Where a result goes: a Storage SCP named ``AET@HOST:PORT``.

The settings validate destinations with it, the result router adds the
calling AE's Storage SCP with it, and delivery opens associations to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pynetdicom.utils import set_ae

_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[A-Za-z0-9.\-:\[\]]+):(?P<port>\d{1,5})$")


def check_ae_title(value: str, field: str) -> str:
    """``value`` stripped, if it is a valid AE title (PS3.5 6.2); else ValueError naming
    ``field``.

    pynetdicom's validation is the one its associations apply: 1-16 characters
    of the default repertoire, no backslash or control characters, not only
    spaces (pydicom's allows a backslash, the multi-value separator).
    """
    try:
        set_ae(value, field, allow_empty=False, allow_none=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}: {value!r} is not a valid AE title (1-16 ASCII, no '\\')"
                         ) from exc
    return value.strip()


@dataclass(frozen=True)
class Destination:
    """A Storage SCP: AE title, host, port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT`` (ValueError if it is not one)."""
        match = _DESTINATION.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"destination {text!r} is not AET@HOST:PORT")
        try:
            ae_title = check_ae_title(match["ae"], "destination")
        except ValueError as exc:
            raise ValueError(f"destination {text!r} is not AET@HOST:PORT") from exc
        return cls(ae_title, match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"
