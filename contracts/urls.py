"""URLs as they may be shown: in messages, logs and CLI output, never with their secrets.

One redaction for every URL the project holds (the broker's AMQP URLs, the vault's SQLite
and MongoDB URLs), so that a URL reads the same wherever it is shown.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

REDACTED = "***"
#: Where one URL of several in a string ends: commas or whitespace before the next scheme.
_NEXT_URL = re.compile(r"\s*[,\s]\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")
# URL options whose value is a credential (MongoDB: a client key's passphrase, AWS tokens).
_SECRET_OPTIONS = frozenset({"tlscertificatekeyfilepassword", "authmechanismproperties"})


def _credentials(url: str) -> tuple[str, str, str | None, str] | None:
    """``(scheme, user, password, rest)`` split at the *last* ``@``, or None without one.

    Not ``urlsplit``: a password with an unescaped ``#``, ``?`` or ``/`` would end its
    authority early, and the password would pass for part of the path.
    """
    scheme, sep, remainder = url.partition("://")
    userinfo, at, rest = remainder.rpartition("@")
    if not sep or not at:
        return None
    user, colon, password = userinfo.partition(":")
    return scheme, user, (password if colon else None), rest


def split_urls(text: str) -> list[str]:
    """The URLs a string holds: one, or several separated by commas or whitespace.

    Split only where the next URL's ``scheme://`` begins, so one URL with a comma in its host
    list (``amqp://u:p@h1,h2/``, ``mongodb://h1,h2/``) or a space in its path stays whole.
    """
    return [part for part in _NEXT_URL.split(text.strip()) if part]


def url_secrets(url: str) -> list[str]:
    """Every secret a URL carries (password, credential options), as written and unquoted.

    ``url`` may hold several URLs (``split_urls``): the secrets of each.
    """
    parts = split_urls(url)
    if len(parts) > 1:
        every = {secret for part in parts for secret in url_secrets(part)}
        return sorted(every, key=len, reverse=True)
    credentials = _credentials(url)
    written = [credentials[2]] if credentials and credentials[2] else []
    query = (credentials[3] if credentials else url).partition("?")[2]
    for name, value in _options(query):
        if name.lower() in _SECRET_OPTIONS and value:
            written.append(value)
    variants = {form for value in written for form in (value, unquote(value), unquote_plus(value))}
    # Longest first, so a secret that contains another is replaced whole.
    return sorted(variants, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` with every secret of ``url`` replaced by ``***`` (for foreign error messages)."""
    for secret in url_secrets(url):
        text = text.replace(secret, REDACTED)
    return text


def redact_url(url: str) -> str:
    """``url`` with its password and credential options replaced by ``***``.

    Several URLs in one string (``split_urls``) are each redacted, shown space-separated.

    ``user:***@host``: the user stays (it says who connects) and the ``***`` says that a
    password was there. Split at the last ``@`` by hand rather than parsed: a password with an
    unescaped ``#``, ``?``, ``/`` or ``@`` must not pass for part of the host or the path.
    """
    parts = split_urls(url)
    if len(parts) > 1:
        return " ".join(redact_url(part) for part in parts)
    if not url_secrets(url):
        return url  # unchanged: a rebuilt URL could respell it (sqlite:///path)
    credentials = _credentials(url)
    if credentials is not None:
        scheme, user, password, rest = credentials
        userinfo = f"{user}:{REDACTED}" if password is not None else user
        url = f"{scheme}://{userinfo}@{rest}"
    base, question, query = url.partition("?")
    if not question:
        return url
    options = "&".join(
        f"{name}={REDACTED}" if name.lower() in _SECRET_OPTIONS else f"{name}={value}"
        for name, value in _options(query)
    )
    return f"{base}?{options}"


def _options(query: str) -> list[tuple[str, str]]:
    """``name=value`` pairs of a query string, values as written (still percent-encoded)."""
    return [
        (name, value)
        for name, _, value in (option.partition("=") for option in query.split("&"))
        if name
    ]
