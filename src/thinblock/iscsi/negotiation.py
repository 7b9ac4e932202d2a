"""Login key negotiation (RFC 7143 section 13) and CHAP (RFC 1994, RFC 7143 12.1.3), sans-IO.

``SessionParameters`` holds the operational values a session runs with; ``negotiate``
answers one batch of an initiator's keys with the target's values and updates them.
The target's own preferences are the ones thinblock wants: immediate and unsolicited
data accepted (ImmediateData=Yes, InitialR2T=No: a 4 KiB write then takes one round
trip, not two), FirstBurstLength 256 KiB, MaxBurstLength 16 MiB and MaxOutstandingR2T 4 at
most (all three Minimum: an initiator's smaller offer stands -- libiscsi offers 256 KiB,
256 KiB and 1), up to ``TARGET_MAX_CONNECTIONS`` connections per session (MC/S), error
recovery level 0.  A connection added to a session negotiates only the connection's own keys
(digests, MaxRecvDataSegmentLength); the "leading only" keys keep the leading connection's
values and are answered Irrelevant.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field

# The target's limits (what it offers and accepts).
TARGET_MAX_RECV_DATA_SEGMENT = 256 * 1024
TARGET_MAX_BURST = 16 * 1024 * 1024
TARGET_FIRST_BURST = 256 * 1024
DEFAULT_MAX_RECV_DATA_SEGMENT = 8192  # RFC 7143 13.12: the default until declared
LOGIN_MAX_RECV_DATA_SEGMENT = 8192  # during login both sides accept at least this
TARGET_PORTAL_GROUP_TAG = 1
TARGET_MAX_CONNECTIONS = 8  # connections one session may have (MaxConnections, result: minimum)
# R2Ts one task may have outstanding (MaxOutstandingR2T, result: minimum): the next bursts of
# a write are asked before the current one's data is in.  libiscsi and open-iscsi offer 1.
TARGET_MAX_OUTSTANDING_R2T = 4
# RFC 7143 13: keys negotiated on the leading connection only ("LO"), session-wide values.
LEADING_ONLY_KEYS = frozenset(
    {
        "MaxConnections",
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "DefaultTime2Wait",
        "DefaultTime2Retain",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
        "ErrorRecoveryLevel",
    }
)
CHAP_MD5 = 5
CHAP_CHALLENGE_BYTES = 16


class NegotiationError(Exception):
    """A key's value is not acceptable: the login fails with an initiator error."""


@dataclass(slots=True)
class SessionParameters:
    """Negotiated values (RFC 7143 defaults until negotiated)."""

    header_digest: bool = False
    data_digest: bool = False
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    max_outstanding_r2t: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    max_connections: int = 1
    # Declarative: the initiator's receive limit bounds our Data-In and Text responses.
    initiator_max_recv_data_segment: int = DEFAULT_MAX_RECV_DATA_SEGMENT
    target_max_recv_data_segment: int = TARGET_MAX_RECV_DATA_SEGMENT
    declared: set[str] = field(default_factory=set)


def _number(key: str, value: str, low: int, high: int) -> int:
    try:
        n = int(value, 0) if value.lower().startswith("0x") else int(value)
    except ValueError:
        raise NegotiationError(f"{key}: not a number: {value!r}") from None
    if not low <= n <= high:
        raise NegotiationError(f"{key}: {n} is outside {low}..{high}")
    return n


def _boolean(key: str, value: str) -> bool:
    if value == "Yes":
        return True
    if value == "No":
        return False
    raise NegotiationError(f"{key}: expected Yes or No, not {value!r}")


def _digest(key: str, value: str) -> str:
    # "HeaderDigest=<list-of-values>": the first value we support wins.
    for choice in value.split(","):
        if choice in ("CRC32C", "None"):
            return choice
    return "Reject"


# Keys that only the initiator declares or only matter at the first PDU: not answered.
_LOGIN_ONLY_DECLARATIONS = {"InitiatorName", "InitiatorAlias", "SessionType", "TargetName"}


def negotiate_operational(
    pairs: list[tuple[str, str]], params: SessionParameters, *, discovery: bool, leading: bool = True
) -> list[tuple[str, str]]:
    """Answer operational keys; returns the response pairs.  Raises NegotiationError.
    ``leading``: False on a connection joining an existing session (LO keys are Irrelevant)."""
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        if key in _LOGIN_ONLY_DECLARATIONS or key.startswith("CHAP_") or key == "AuthMethod":
            continue
        if value == "NotUnderstood" or value == "Irrelevant" or value == "Reject":
            continue
        if not leading and key in LEADING_ONLY_KEYS:
            out.append((key, "Irrelevant"))
            continue
        if key == "HeaderDigest":
            chosen = _digest(key, value)
            params.header_digest = chosen == "CRC32C"
            out.append((key, chosen))
        elif key == "DataDigest":
            chosen = _digest(key, value)
            params.data_digest = chosen == "CRC32C"
            out.append((key, chosen))
        elif key == "MaxConnections":
            params.max_connections = min(_number(key, value, 1, 65535), TARGET_MAX_CONNECTIONS)
            out.append((key, str(params.max_connections)))
        elif key == "InitialR2T":
            # Result function OR; the target says No, so the initiator's value stands.
            params.initial_r2t = _boolean(key, value)
            out.append((key, "Yes" if params.initial_r2t else "No"))
        elif key == "ImmediateData":
            # Result function AND; the target says Yes.
            params.immediate_data = _boolean(key, value)
            out.append((key, "Yes" if params.immediate_data else "No"))
        elif key == "MaxRecvDataSegmentLength":
            params.initiator_max_recv_data_segment = _number(key, value, 512, 16777215)
            params.declared.add(key)
        elif key == "MaxBurstLength":
            params.max_burst_length = min(_number(key, value, 512, 16777215), TARGET_MAX_BURST)
            out.append((key, str(params.max_burst_length)))
        elif key == "FirstBurstLength":
            params.first_burst_length = min(_number(key, value, 512, 16777215), TARGET_FIRST_BURST)
            out.append((key, str(params.first_burst_length)))
        elif key == "DefaultTime2Wait":
            params.default_time2wait = max(_number(key, value, 0, 3600), 2)
            out.append((key, str(params.default_time2wait)))
        elif key == "DefaultTime2Retain":
            params.default_time2retain = min(_number(key, value, 0, 3600), 0)
            out.append((key, str(params.default_time2retain)))
        elif key == "MaxOutstandingR2T":
            params.max_outstanding_r2t = min(_number(key, value, 1, 65535), TARGET_MAX_OUTSTANDING_R2T)
            out.append((key, str(params.max_outstanding_r2t)))
        elif key in ("DataPDUInOrder", "DataSequenceInOrder"):
            _boolean(key, value)
            out.append((key, "Yes"))  # result function OR: the target's Yes wins
        elif key == "ErrorRecoveryLevel":
            params.error_recovery_level = min(_number(key, value, 0, 2), 0)
            out.append((key, "0"))
        elif key in ("IFMarker", "OFMarker"):
            out.append((key, "No"))
        elif key in ("IFMarkInt", "OFMarkInt"):
            out.append((key, "Irrelevant"))
        elif key in ("TargetAlias", "TargetAddress", "TargetPortalGroupTag"):
            # Sent by targets only: "an initiator MUST NOT send" them.
            raise NegotiationError(f"{key} is a key only a target sends")
        elif key == "SendTargets":
            out.append((key, "Irrelevant"))
        else:
            out.append((key, "NotUnderstood"))
    if params.first_burst_length > params.max_burst_length:
        params.first_burst_length = params.max_burst_length
    if discovery:
        # RFC 7143 13: most operational keys are irrelevant in a discovery session; the
        # answers above are still valid values, so initiators accept them.
        pass
    return out


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """One-way CHAP: the initiator proves ``user``/``secret``; mutual CHAP: the target then
    proves ``mutual_user``/``mutual_secret`` to the initiator."""

    user: str
    secret: str
    mutual_user: str | None = None
    mutual_secret: str | None = None


def chap_response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994: MD5(identifier || secret || challenge)."""
    return hashlib.md5(bytes([identifier]) + secret + challenge, usedforsecurity=False).digest()


def _decode_binary(key: str, value: str) -> bytes:
    """RFC 7143 6.1 binary values: 0x... hex or 0b... base64."""
    try:
        if value[:2] in ("0x", "0X"):
            return bytes.fromhex(value[2:])
        if value[:2] in ("0b", "0B"):
            import base64

            return base64.b64decode(value[2:], validate=True)
    except ValueError:
        pass
    raise NegotiationError(f"{key}: not a binary value: {value[:32]!r}")


class ChapAuthenticator:
    """The target side of a CHAP exchange, step by step (RFC 7143 12.1.3)."""

    def __init__(self, credentials: ChapCredentials) -> None:
        self.credentials = credentials
        self.identifier = os.urandom(1)[0]
        self.challenge = os.urandom(CHAP_CHALLENGE_BYTES)
        self.state = "algorithm"  # -> response -> done
        self.used_challenges: set[bytes] = {self.challenge}

    def step(self, keys: dict[str, str]) -> tuple[list[tuple[str, str]], bool]:
        """Consume the initiator's CHAP keys; returns (pairs to send, finished).  Raises
        NegotiationError on a failed or malformed exchange (the login fails)."""
        if self.state == "algorithm":
            algorithms = keys.get("CHAP_A")
            if algorithms is None:
                raise NegotiationError("CHAP: the initiator did not send CHAP_A")
            if str(CHAP_MD5) not in algorithms.split(","):
                raise NegotiationError("CHAP: only MD5 (CHAP_A=5) is supported")
            self.state = "response"
            return [
                ("CHAP_A", str(CHAP_MD5)),
                ("CHAP_I", str(self.identifier)),
                ("CHAP_C", "0x" + self.challenge.hex()),
            ], False
        if self.state == "response":
            name = keys.get("CHAP_N")
            response = keys.get("CHAP_R")
            if name is None or response is None:
                raise NegotiationError("CHAP: CHAP_N and CHAP_R are missing")
            creds = self.credentials
            expected = chap_response(self.identifier, creds.secret.encode(), self.challenge)
            if name != creds.user or not hmac.compare_digest(_decode_binary("CHAP_R", response), expected):
                raise NegotiationError("CHAP: authentication failed")
            out: list[tuple[str, str]] = []
            if "CHAP_I" in keys or "CHAP_C" in keys:
                if creds.mutual_user is None or creds.mutual_secret is None:
                    raise NegotiationError("CHAP: mutual CHAP asked for but no target secret is configured")
                identifier = _number("CHAP_I", keys.get("CHAP_I", ""), 0, 255)
                challenge = _decode_binary("CHAP_C", keys.get("CHAP_C", ""))
                # RFC 7143 12.1.3: the target MUST refuse a challenge equal to its own.
                if challenge in self.used_challenges or not challenge:
                    raise NegotiationError("CHAP: the initiator's challenge repeats the target's")
                out = [
                    ("CHAP_N", creds.mutual_user),
                    (
                        "CHAP_R",
                        "0x" + chap_response(identifier, creds.mutual_secret.encode(), challenge).hex(),
                    ),
                ]
            self.state = "done"
            return out, True
        raise NegotiationError("CHAP: the exchange is already complete")
