"""Credentials never reach a log line, a message or an output file.

:func:`redact` masks, in any text: OAuth client secrets / tokens in form bodies, JSON and Python reprs
(``client_secret=...``, ``"access_token": "..."``), ``Authorization`` headers, Azure SAS signatures (``sig=``) and
the other SAS query fields, ``user:password@`` in URLs, subscription keys, and the literal values of the
credential environment variables (``SH_CLIENT_SECRET`` ...) wherever they appear. :class:`RedactingFilter` applies
it to every log record (message, arguments, exception text); the CLI installs it on the root handlers, so the DEBUG
output of requests_oauthlib, urllib3 and sentinelhub is covered at any verbosity.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"

#: environment variables whose values are credentials (their literal values are masked anywhere).
SECRET_ENV = ("SH_CLIENT_SECRET", "SH_CLIENT_ID", "PC_SDK_SUBSCRIPTION_KEY", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_ACCESS_KEY", "CLOUDFREE_API_KEY")

_KEYS = (r"client_secret|client_id|access_token|refresh_token|id_token|token|password|passwd|secret|api_key|apikey"
         r"|subscription[_-]key|sh_client_secret|sh_client_id|sig|signature|x-amz-signature|x-amz-security-token"
         r"|x-amz-credential|ocp-apim-subscription-key")
_PATTERNS = [
    # key=value in query strings / form bodies (client_secret=abc&..., ?sig=...&se=...)
    (re.compile(rf"(?i)\b({_KEYS})=([^&\s'\"<>,;]+)"), rf"\1={MASK}"),
    # "key": "value" / 'key': 'value' (JSON, Python reprs) and key: value (YAML, headers)
    (re.compile(rf"(?i)([\"']?(?:{_KEYS})[\"']?\s*[:=]\s*[\"'])([^\"']+)([\"'])"), rf"\1{MASK}\3"),
    (re.compile(r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?)(bearer|basic|token)?\s*([^\s\"',}]+)"),
     rf"\1\2 {MASK}"),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]+=*"), f"Bearer {MASK}"),
    # scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+):([^@\s/]+)@"), rf"\1:{MASK}@"),
]


def _env_secrets() -> list[str]:
    vals = [os.environ.get(k, "") for k in SECRET_ENV]
    return sorted({v for v in vals if len(v) >= 4}, key=len, reverse=True)


def redact(text: object) -> str:
    """``text`` with every credential masked (see the module docstring)."""
    s = str(text)
    for v in _env_secrets():
        s = s.replace(v, MASK)
    for pat, rep in _PATTERNS:
        s = pat.sub(rep, s)
    return s


#: C0/C1 control characters (newline, CR, ESC of ANSI sequences, NUL, DEL ...) and the Unicode line separators and
#: bidirectional overrides that can forge or hide text on a terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEP_NL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\r``, ``\\x1b`` ...): a catalog string (item id,
    ``s2:mgrs_tile``) can then neither forge a log or result line nor move the cursor or recolour a terminal.
    ``keep_newlines``: our own multi-line messages (config errors) keep their line breaks."""
    return (_CONTROL_KEEP_NL if keep_newlines else _CONTROL).sub(_escape, str(text))


def clean(text: object, *, keep_newlines: bool = False) -> str:
    """:func:`redact` then :func:`printable`: what every message printed to a terminal or a report goes through."""
    return printable(redact(text), keep_newlines=keep_newlines)


class RedactingFilter(logging.Filter):
    """A logging filter that masks credentials in the formatted message and exception text of every record, and
    escapes control characters in the message (one record is one line: catalog strings cannot forge lines).

    ``tracebacks=False`` (the CLI below ``-vv``) drops the traceback of a record logged with ``exc_info`` and
    appends the exception's one-line text instead."""

    _fmt = logging.Formatter()

    def __init__(self, tracebacks: bool = True) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not break logging
            msg = f"{record.msg!r} {record.args!r}"
        if record.exc_info and not self.tracebacks:
            exc = record.exc_info[1]
            if exc is not None:
                msg = f"{msg} ({type(exc).__name__}: {exc})"
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = clean(msg), ()
        if record.exc_info:
            record.exc_text = clean(self._fmt.formatException(record.exc_info), keep_newlines=True)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = clean(record.exc_text, keep_newlines=True) if self.tracebacks else None
        if record.stack_info:
            record.stack_info = clean(record.stack_info, keep_newlines=True) if self.tracebacks else None
        return True


def install(handlers: list[logging.Handler] | None = None, *, tracebacks: bool = True) -> RedactingFilter:
    """Add one :class:`RedactingFilter` to ``handlers`` (default: the handlers of the root logger and of every
    logger that has its own, e.g. ``distributed``'s); an existing one gets the ``tracebacks`` setting."""
    f = RedactingFilter(tracebacks)
    if handlers is None:
        loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                           if isinstance(lg, logging.Logger)]
        handlers = [h for lg in loggers for h in lg.handlers]
    for h in handlers:
        mine = [x for x in h.filters if isinstance(x, RedactingFilter)]
        if mine:
            for x in mine:
                x.tracebacks = tracebacks
        else:
            h.addFilter(f)
    return f


def tracebacks_shown() -> bool:
    """Whether the root logger's filter lets tracebacks through (True when no filter is installed)."""
    for h in logging.getLogger().handlers:
        for x in h.filters:
            if isinstance(x, RedactingFilter):
                return x.tracebacks
    return True


def install_hooks() -> None:
    """Uncaught exceptions in threads are logged (through the filter) instead of printed raw by Python."""
    import threading

    def hook(args) -> None:
        if args.exc_type is SystemExit:
            return
        logging.getLogger("cloudfree").error("uncaught error in thread %s", getattr(args.thread, "name", "?"),
                                             exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    threading.excepthook = hook


try:  # dask.distributed is optional: without it there are no worker processes to cover
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover
    _WorkerPlugin = object  # type: ignore[assignment,misc]


class RedactWorkerLogs(_WorkerPlugin):
    """A dask.distributed worker plugin: every log handler in the worker's process gets the
    :class:`RedactingFilter` (worker processes configure their own logging and write to their own stderr)."""

    name = "cloudfree-redact-logs"

    def __init__(self, tracebacks: bool = True) -> None:
        self.tracebacks = tracebacks

    def setup(self, worker=None) -> None:
        install(tracebacks=self.tracebacks)
