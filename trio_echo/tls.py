"""TLS for ``tls://`` listeners: the server's ``ssl.SSLContext`` from ``[tls]``.

Built at start and again on every reload, so a renewed certificate (same file names, new contents)
is used for new connections after SIGHUP; open connections keep the session they have.
"""

from __future__ import annotations

import ssl

import attrs

from .addresses import TLS_TRANSPORTS
from .config import Config, TlsConfig
from .errors import ConfigError

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
SNI_ATTRIBUTE = "trio_echo_sni"  # where the web context's callback leaves the name a client asked for


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """A server context with the configured chain, minimum version and (optionally) client CA.

    Raises:
        ConfigError: a file is missing or unreadable, or the key does not match the certificate.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[config.min_version]
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "tls.cert_file", config.cert_file, f"cannot load the certificate and key: {exc}"
        ) from None
    if config.client_ca_file:
        try:
            context.load_verify_locations(cafile=config.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls.client_ca_file", config.client_ca_file, f"cannot load: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, no echo
    return context


def web_context(config: TlsConfig) -> ssl.SSLContext:
    """The context of ``https://`` listeners: the same chain, ALPN ``http/1.1`` (what the listener
    speaks), and the server name the client asked for (SNI) kept on its SSL object for the JSON echo
    (a server-side SSL object does not report it otherwise)."""
    context = server_context(config)
    context.set_alpn_protocols(["http/1.1"])
    context.sni_callback = _remember_sni
    return context


def _remember_sni(ssl_object: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
    setattr(ssl_object, SNI_ATTRIBUTE, name)


def sni_of(stream_ssl_object: object) -> str | None:
    """The server name a client sent, as ``web_context`` kept it (None: it sent none)."""
    name = getattr(stream_ssl_object, SNI_ATTRIBUTE, None)
    return name if isinstance(name, str) else None


@attrs.frozen
class Contexts:
    """The server's TLS contexts: ``stream`` for ``tls://`` listeners, ``web`` for ``https://``
    (None where no listener needs one)."""

    stream: ssl.SSLContext | None = None
    web: ssl.SSLContext | None = None

    @classmethod
    def from_config(cls, config: Config) -> Contexts:
        """Raises ConfigError as ``server_context`` does."""
        used = {entry.address.transport for entry in config.server.listen} & set(TLS_TRANSPORTS)
        return cls(
            stream=server_context(config.tls) if "tls" in used else None,
            web=web_context(config.tls) if "https" in used else None,
        )
