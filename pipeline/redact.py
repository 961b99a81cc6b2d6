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


class RedactingFilter(logging.Filter):
    """A logging filter that masks credentials in the formatted message and exception text of every record."""

    _fmt = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not break logging
            msg = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = redact(msg), ()
        if record.exc_info:
            record.exc_text = redact(self._fmt.formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(handlers: list[logging.Handler] | None = None) -> RedactingFilter:
    """Add one :class:`RedactingFilter` to ``handlers`` (default: the root logger's handlers)."""
    f = RedactingFilter()
    for h in handlers if handlers is not None else logging.getLogger().handlers:
        if not any(isinstance(x, RedactingFilter) for x in h.filters):
            h.addFilter(f)
    return f
