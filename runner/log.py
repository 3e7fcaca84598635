"""Structured logs on stderr: one JSON object per line (time, level, event, fields), or a
plain line for people with the text format."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Literal, TextIO

Format = Literal["json", "text"]
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger:
    def __init__(
        self, fmt: Format = "json", stream: TextIO | None = None, level: str = "info"
    ) -> None:
        self.fmt = fmt
        self.stream = stream
        self.threshold = _LEVELS[level]

    def configure(self, fmt: Format, level: str = "info") -> None:
        self.fmt = fmt
        self.threshold = _LEVELS[level]

    def log(self, level: str, event: str, **fields: object) -> None:
        if _LEVELS[level] < self.threshold:
            return
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.fmt == "json":
            line = json.dumps({"time": now, "level": level, "event": event, **fields}, default=str)
        else:
            extra = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
            line = f"{now} {level.upper():7} {event}" + (f" {extra}" if extra else "")
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def debug(self, event: str, **fields: object) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: object) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: object) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: object) -> None:
        self.log("error", event, **fields)


def _text(value: object) -> str:
    s = value if isinstance(value, str) else json.dumps(value, default=str)
    return s if s and " " not in s else json.dumps(s)


log = Logger()
