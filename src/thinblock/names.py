"""What a name may be, said once: the engine, the API (bodies and paths) and the CLI refuse a bad
name with the same sentence ("volume names are 1-63 characters of ...").

Volume and pool names: 1-63 characters, letters, digits and ``. _ : + -``, starting with a
letter or digit.  63 keeps a volume's iSCSI target name ``iqn.2026-12.org.thinblock:NODE:VV``
inside the 223 bytes RFC 7143 (6.1) allows an iSCSI name with a host name as NODE (at most 63
per label), and names short enough for a table column and a shell; the characters are those
an NBD URI path, an IQN and a shell word take without quoting.  Token names keep their own
characters (``@`` for user@host, no ``:`` or ``+``), under the same sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidArgument


@dataclass(frozen=True)
class NameRule:
    kind: str  # "volume", "pool", "token"
    max_length: int
    pattern: re.Pattern[str]
    characters: str  # the allowed characters, as the sentence says them

    @property
    def sentence(self) -> str:
        return (
            f"{self.kind} names are 1-{self.max_length} characters of {self.characters},"
            " starting with a letter or digit"
        )

    def problem(self, name: object) -> str | None:
        """The one-line refusal for ``name``, or None when it is a valid name."""
        if isinstance(name, str) and len(name) <= self.max_length and self.pattern.fullmatch(name):
            return None
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:77] + "...")
        return f"invalid {self.kind} name {shown}: {self.sentence}"

    def check(self, name: object) -> str:
        """``name`` when valid; InvalidArgument with the sentence otherwise."""
        problem = self.problem(name)
        if problem is not None:
            raise InvalidArgument(problem)
        assert isinstance(name, str)
        return name

    @property
    def json_pattern(self) -> str:
        """The rule as a JSON-schema pattern (for OpenAPI; the check above is what decides)."""
        return self.pattern.pattern


MAX_NAME = 63
_OBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,62}$")
VOLUME = NameRule("volume", MAX_NAME, _OBJECT, "letters, digits and . _ : + -")
POOL = NameRule("pool", MAX_NAME, _OBJECT, "letters, digits and . _ : + -")
TOKEN = NameRule(
    "token", 64, re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"), "letters, digits and . _ @ -"
)
