"""Vault URLs as they may be shown: in messages, logs and CLI output, never with their secrets."""

from __future__ import annotations

from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

REDACTED = "***"
# URL options whose value is a credential (MongoDB: a client key's passphrase, AWS tokens).
_SECRET_OPTIONS = frozenset({"tlscertificatekeyfilepassword", "authmechanismproperties"})


def url_secrets(url: str) -> list[str]:
    """Every secret a URL carries (password, credential options), as written and unquoted."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    written = [password] if password else []
    for name, value in _options(parts.query):
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
    """``url`` with its password and credential options replaced by ``***``."""
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:
        return f"{url.partition('://')[0]}://{REDACTED}"
    if not url_secrets(url):
        return url  # unchanged: urlunsplit would respell some URLs (sqlite:///path)
    netloc = parts.netloc
    if has_password:
        userinfo, _, hosts = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{hosts}"
    query = "&".join(
        f"{name}={REDACTED}" if name.lower() in _SECRET_OPTIONS else f"{name}={value}"
        for name, value in _options(parts.query)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _options(query: str) -> list[tuple[str, str]]:
    """``name=value`` pairs of a query string, values as written (still percent-encoded)."""
    return [
        (name, value)
        for name, _, value in (option.partition("=") for option in query.split("&"))
        if name
    ]
