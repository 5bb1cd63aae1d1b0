"""The start-up read of each topic's ``requiresDuplicateDetection`` (``ServiceBusEventPublisher.check_topics``)
through azure-servicebus's real administration client, over HTTPS, against a stand-in for the Service
Bus management endpoint (the ATOM entry ``GET https://{namespace}/{topic}?api-version=...`` answers, as
the REST reference "Get Entity" shows it). No Service Bus or emulator runs here and the AMQP peer speaks
no HTTP, so this small server is the one place the answer can come from; its certificate is trusted
through ``SSL_CERT_FILE`` in a child process (aiohttp reads the trust store when it is imported)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

KEY = "bWFuYWdlLWtleS1zZWNyZXQ="
TOPICS = {"dd-on": True, "dd-off": False}
ENTRY = """<entry xmlns="http://www.w3.org/2005/Atom"><id>https://ns/{name}</id><title type="text">{name}</title>
<updated>2026-11-30T12:00:00Z</updated><content type="application/xml">
<TopicDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"
 xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><DefaultMessageTimeToLive>P14D</DefaultMessageTimeToLive>
<MaxSizeInMegabytes>1024</MaxSizeInMegabytes><RequiresDuplicateDetection>{dd}</RequiresDuplicateDetection>
<DuplicateDetectionHistoryTimeWindow>PT10M</DuplicateDetectionHistoryTimeWindow><EnableBatchedOperations>true</EnableBatchedOperations>
<Status>Active</Status></TopicDescription></content></entry>"""
# An entity that does not exist: Service Bus answers 200 with an empty feed.
EMPTY = '<feed xmlns="http://www.w3.org/2005/Atom"><title type="text">Publicly Listed Services</title></feed>'


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class Management(BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []  # (path, authorization scheme)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        topic = self.path.split("?")[0].strip("/")
        Management.seen.append((self.path, self.headers.get("Authorization", "").split(" ")[0]))
        body = (ENTRY.format(name=topic, dd=str(TOPICS[topic]).lower()) if topic in TOPICS else EMPTY).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/atom+xml;type=entry;charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


CHILD = """
import asyncio, json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
logging.getLogger("azure").setLevel(logging.WARNING)
from sidecar.providers.servicebus.config import ServiceBusConfig
from sidecar.providers.servicebus.publisher import ServiceBusEventPublisher
cs, topic, types = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
publisher = ServiceBusEventPublisher(ServiceBusConfig(enabled=True, connectionstring=cs, topic=topic))
print(json.dumps(asyncio.run(publisher.check_topics(types))))
"""


def read(port: int, cert: Path, topic: str, types: list[str]) -> tuple[object, str]:
    cs = f"Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=Root;SharedAccessKey={KEY}"
    done = subprocess.run([sys.executable, "-c", CHILD, cs, topic, json.dumps(types)], capture_output=True, text=True,
                          timeout=120, env={"SSL_CERT_FILE": str(cert), "PATH": "/usr/bin:/bin"},
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_the_start_up_read_says_which_topics_drop_a_resend(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Management)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        on, said_on = read(port, cert, "{eventType}", ["dd-on"])
        assert on is True and "INFO topic dd-on has duplicate detection" in said_on, said_on
        mixed, said_mixed = read(port, cert, "", ["dd-on", "dd-off"])
        assert mixed is False and "WARNING topic dd-off has no duplicate detection" in said_mixed, said_mixed
        assert "dd-on" not in said_mixed.split("WARNING")[1].split("(")[0]
        fixed, said_fixed = read(port, cert, "dd-off", ["a", "b"])  # one fixed topic, read once
        assert fixed is False and said_fixed.count("WARNING topic dd-off") == 1
        missing, said_missing = read(port, cert, "", ["nowhere"])
        assert missing is None and "WARNING could not read whether topic nowhere has duplicate detection" in said_missing
        for said in (said_on, said_mixed, said_fixed, said_missing):
            assert KEY not in said
    finally:
        server.shutdown()
    # The client really asked this server, signed with the rule's key (a SAS token, never the key itself).
    assert {path.split("?")[0] for path, _ in Management.seen} >= {"/dd-on", "/dd-off", "/nowhere"}
    assert {scheme for _, scheme in Management.seen} == {"SharedAccessSignature"}
