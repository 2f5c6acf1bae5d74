"""TLS for ``tls://`` listeners: the server's ``ssl.SSLContext`` from ``[tls]``.

Built at start and again on every reload, so a renewed certificate (same file names, new contents)
is used for new connections after SIGHUP; open connections keep the session they have.
"""

from __future__ import annotations

import ssl

from .config import TlsConfig
from .errors import ConfigError

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


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
