"""Microsoft Entra ID stand-ins for tests: a managed identity endpoint on loopback, and TLS files.

:class:`IdentityEndpoint` answers the App Service managed identity protocol that azure-identity's
``ManagedIdentityCredential`` speaks when ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` are set:
``GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=R[&client_id=C]`` with the header
``X-IDENTITY-HEADER``, answered with ``{"access_token", "expires_on", "resource", "token_type"}``.
The access token is a JWT signed RS256 with the endpoint's own key, with the claims Microsoft Entra
ID puts in an access token (``aud`` = the resource, ``iss`` = ``https://sts.windows.net/{tid}/``,
``iat``/``nbf``/``exp``, ``oid``, ``tid``, ``appid``): what Azurite's OAuth mode checks
(``BlobTokenAuthenticator``: issuer prefix, audience, lifetime) and what the AMQP test peer verifies,
signature included (:meth:`IdentityEndpoint.verify`).

:func:`self_signed_tls` makes a self-signed certificate for ``127.0.0.1``/``localhost`` that clients
trust through their verification setting (``SSL_CERT_FILE``, httpx's ``verify=``).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

STORAGE_AUDIENCE = "https://storage.azure.com"
SERVICE_BUS_AUDIENCE = "https://servicebus.azure.net"


@dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate (also the CA to trust: it is self-signed) and its private key."""

    cert: Path
    key: Path


def self_signed_tls(folder: Path) -> TlsFiles:
    """Write a self-signed certificate for 127.0.0.1 and localhost (valid one day) into ``folder``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=True,
                                     content_commitment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = TlsFiles(folder / "cert.pem", folder / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


@dataclass
class TokenRequest:
    """One request the endpoint answered: the resource and client id asked for, the status given."""

    resource: str
    client_id: str | None
    status: int


@dataclass
class IdentityEndpoint:
    """An App Service style managed identity endpoint on ``127.0.0.1`` (a daemon thread).

    Attributes a test may change while it runs: ``refuse`` (answer 400 "identity not found", as
    Microsoft Entra ID does for an unknown identity), ``issuer`` (the ``iss`` claim),
    ``lifetime`` (token lifetime, seconds).
    """

    tenant_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    object_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    refuse: bool = False
    issuer: str = ""
    lifetime: int = 3600
    requests: list[TokenRequest] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = self.key.public_key()
        self.issuer = self.issuer or f"https://sts.windows.net/{self.tenant_id}/"
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                status, body = endpoint._answer(self.path, self.headers.get("X-IDENTITY-HEADER"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/msi/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        """The variables that point azure-identity's ManagedIdentityCredential at this endpoint."""
        return {"IDENTITY_ENDPOINT": self.url, "IDENTITY_HEADER": self.secret}

    def _answer(self, path: str, header: str | None) -> tuple[int, dict]:
        query = {k: v[0] for k, v in parse_qs(urlparse(path).query).items()}
        resource, client_id = query.get("resource", ""), query.get("client_id")
        if header != self.secret:
            status, body = 401, {"error": "unauthorized", "error_description": "X-IDENTITY-HEADER is wrong"}
        elif query.get("api-version") != "2019-08-01" or not resource:
            status, body = 400, {"error": "invalid_request", "error_description": "api-version or resource"}
        elif self.refuse:
            status, body = 400, {"error": "invalid_request", "error_description": "Identity not found"}
        else:
            now = int(time.time())
            claims = {"aud": resource, "iss": self.issuer, "iat": now, "nbf": now, "exp": now + self.lifetime,
                      "oid": self.object_id, "tid": self.tenant_id, "sub": self.object_id,
                      "appid": client_id or "system-assigned", "ver": "1.0"}
            token = jwt.encode(claims, self.key, algorithm="RS256")
            self.issued.append(token)
            status, body = 200, {"access_token": token, "expires_on": str(now + self.lifetime),
                                 "resource": resource, "token_type": "Bearer", "client_id": client_id or ""}
        self.requests.append(TokenRequest(resource, client_id, status))
        return status, body

    def verify(self, token: str, audience: str) -> dict:
        """The claims of ``token`` if this endpoint signed it for ``audience`` (with or without a
        trailing slash) and it is within its lifetime.

        Raises:
            jwt.InvalidTokenError: it is not (bad signature, audience, issuer or lifetime).
        """
        return jwt.decode(token, self.public_key, algorithms=["RS256"], audience=[audience, audience + "/"],
                          issuer=self.issuer, options={"require": ["exp", "nbf", "iat", "aud", "iss"]})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
