"""Readiness probes shared by the launcher, the supervisor and the OpenAI frontend's process
manager: an HTTP 200 from a URL, and the reason a start failed from tritonserver's log."""

from __future__ import annotations

import http.client
import re
import urllib.request


def http_ok(url: str, timeout_s: float = 2) -> bool:
    """Whether ``url`` answers 200 (no answer, a slow one, or one that is not HTTP is not
    ready: before the server binds its port, a probe from an ephemeral port may connect to
    itself and read its own request back, ``BadStatusLine``)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (OSError, http.client.HTTPException):
        return False


# Triton's log lines that say why a model did not load, most specific first
_FAILURE_PATTERNS = (
    re.compile(r"failed to load '([^']+)' version \d+: (.+)$"),
    re.compile(r"(?:^|\] )(?:E\d{4} [^\]]*\] )?(.*(?:Error|Mismatch|Exception): .+)$"),
)
# an engine core's own error line (core/proc.py's log format), e.g. why it exited
_CORE_ERROR = re.compile(r"^tritonkv ERROR: (engine core .+)$")


def failure_reason(log: str) -> str | None:
    """The reason a start failed, in one line, from tritonserver's log (None if not found)."""
    # Triton writes a Python traceback as literal "\n" sequences: the reason is the first line
    lines = [line.split("\\n", 1)[0] for line in log.splitlines()]
    for line in lines:
        m = _FAILURE_PATTERNS[0].search(line)
        if m:
            reason = f"model {m.group(1)!r} failed to load: {m.group(2).strip()}"
            # a core that exited while starting said why in this log, which goes with the
            # server's work folder: the reason carries its last error line
            said = [c.group(1) for c in map(_CORE_ERROR.match, lines) if c]
            if said and "exited while starting" in reason:  # (core/client.py's words)
                reason += f" (the core logged: {said[-1]})"
            return reason
    for line in reversed(lines):
        m = _FAILURE_PATTERNS[1].search(line)
        if m:
            return m.group(1).strip()
    return None


_PROGRESS_RE = re.compile(r"successfully loaded '([^']+)'|^tritonkv (?:INFO|WARNING): (.+)$", re.M)


def progress_lines(log: str) -> list[str]:
    """What a start has done so far, from the server log, in order: the engines' own lines
    (KV pool, "KV capacity: ...", CUDA graphs captured, warnings) and each model loaded."""
    return [f"model {m.group(1)} loaded" if m.group(1) else m.group(2) for m in _PROGRESS_RE.finditer(log)]
