"""Logs are logfmt with fields as fields (issue 16): no ``key=%s`` inside a message, where a
log reader cannot select on it; the formatter writes ``extra`` fields as ``key=value``."""

from __future__ import annotations

import ast
import io
import logging
import re
from pathlib import Path

from thinblock.daemon import LogfmtFormatter

SRC = Path(__file__).resolve().parents[2] / "src" / "thinblock"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
# `ld=%d`, `vv=%s`, `kind=%s`: a field written into the message text.
FIELD_IN_MESSAGE = re.compile(r"\b[a-z_]+=%[-0-9.]*[sdrfx]")


def _logging_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if node.func.attr not in LEVELS or not (
            isinstance(owner, ast.Name) and owner.id in ("log", "logger")
        ):
            continue
        args = node.args[1:] if node.func.attr == "log" else node.args
        if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
            found.append((node.lineno, args[0].value))
    return found


def test_no_message_carries_a_field() -> None:
    offenders = []
    checked = 0
    for path in sorted(SRC.rglob("*.py")):
        for line, message in _logging_calls(ast.parse(path.read_text(), str(path))):
            checked += 1
            if FIELD_IN_MESSAGE.search(message):
                offenders.append(f"{path.relative_to(SRC)}:{line}: {message!r}")
    assert checked > 100  # the walk finds the logging calls
    assert offenders == [], "fields written into messages (use extra=):\n" + "\n".join(offenders)


def test_the_walk_would_find_one() -> None:
    tree = ast.parse('log.info("vv created vv=%s pool=%s", name, pool)\nlog.log(20, "ld=%d gone", 3)')
    assert [bool(FIELD_IN_MESSAGE.search(m)) for _, m in _logging_calls(tree)] == [True, True]


def test_extra_fields_are_logfmt_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    logger = logging.getLogger("thinblock.test-log-fields")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(
            "vv created", extra={"event": "vv-created", "vv": "db 1", "size": 1 << 30, "cache": "writeback"}
        )
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue().strip()
    assert line.startswith("ts=") and " level=warning logger=thinblock.test-log-fields " in line
    assert line.endswith(' event=vv-created msg="vv created" vv="db 1" size=1073741824 cache=writeback')
