"""Azurite, the Azure Storage emulator from npm, as a local blob endpoint for tests and benchmarks.

``scripts/setup test`` installs it into ``.tools/node_modules``; :func:`run_azurite` starts its blob
service only on a free loopback port with temporary storage. Flags (Azurite README):
``--skipApiVersionCheck`` because the current SDK speaks a newer API version than Azurite accepts,
``--disableTelemetry`` so nothing is sent anywhere, ``--silent`` for no access log.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import tempfile
import uuid
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from sidecar.providers.azureblob.config import AzureBlobConfig
from testsupport.identity import TlsFiles
from testsupport.processes import ROOT, dev_args, dies_with_parent, free_port, stop_process_group, wait_http

# Azurite's development account and its well-known key (public, in Azurite's documentation).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass(frozen=True)
class Azurite:
    """A running Azurite blob service on ``127.0.0.1:port`` (process ``proc``)."""

    port: int
    proc: subprocess.Popen
    scheme: str = "http"
    log: Path | None = None  # Azurite's debug log, when started with one

    @property
    def endpoint(self) -> str:
        """The blob endpoint of the development account (path-style, as Azurite serves it)."""
        return f"{self.scheme}://127.0.0.1:{self.port}/{ACCOUNT}"

    def connection_string(self, key: str = ACCOUNT_KEY) -> str:
        """A connection string for the development account, signing with ``key``."""
        return (f"DefaultEndpointsProtocol={self.scheme};AccountName={ACCOUNT};AccountKey={key};"
                f"BlobEndpoint={self.endpoint};")


def sidecar_args(azurite: Azurite, container: str, event_id: str, correlation_id: str, name: str,
                 parent: str = "") -> list[str]:
    """Seed flags of a sidecar whose blobs live in ``container`` on ``azurite``; documents and events
    stay on the development providers (not development mode, which would contradict the provider)."""
    context = [a for a in dev_args(event_id, correlation_id, name, parent=parent) if a != "--development=true"]
    return context + ["--azureblobprovider=true", f"--azureblobprovider.containername={container}",
                      f"--azureblobprovider.connectionstring={azurite.connection_string()}"]


def azurite_executable() -> str:
    """The ``azurite-blob`` command: on PATH (scripts/test) or in this checkout's ``.tools``.

    Raises:
        FileNotFoundError: Azurite is not installed (run ``scripts/setup test``).
    """
    found = shutil.which("azurite-blob") or ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
    if not Path(found).is_file():
        raise FileNotFoundError("azurite-blob not found: run scripts/setup test (npm install azurite)")
    return str(found)


@contextmanager
def run_azurite(timeout: float = 60, tls: TlsFiles | None = None) -> Iterator[Azurite]:
    """Start Azurite's blob service with temporary storage; stop it and delete the storage on exit.

    Args:
        tls: serve HTTPS with this certificate and key, in OAuth mode (``--oauth basic``: bearer
            tokens accepted, which Azurite allows only over HTTPS), with a debug log (``Azurite.log``).

    Raises:
        FileNotFoundError: Azurite is not installed.
        RuntimeError: it did not answer within ``timeout`` seconds (its output is in the message).
    """
    location = Path(tempfile.mkdtemp(prefix="sidecar-azurite-"))
    port = free_port()
    log_path = location / "azurite.log"
    argv = [azurite_executable(), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(location),
            "--skipApiVersionCheck", "--disableTelemetry", "--silent"]
    debug_log = None
    if tls is not None:
        debug_log = location / "debug.log"
        argv += ["--cert", str(tls.cert), "--key", str(tls.key), "--oauth", "basic", "--debug", str(debug_log)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=dies_with_parent())
    azurite = Azurite(port, proc, "https" if tls else "http", debug_log)
    try:
        try:
            # Any HTTP answer means it listens; an unsigned request gets 403.
            wait_http(f"{azurite.endpoint}?comp=list", timeout, ok=(200, 403), proc=proc,
                      verify=ssl.create_default_context(cafile=str(tls.cert)) if tls else True)
        except Exception as exc:
            raise RuntimeError(f"Azurite did not start: {exc}\n{log_path.read_text(errors='replace')}") from None
        yield azurite
    finally:
        stop_process_group(proc)
        shutil.rmtree(location, ignore_errors=True)


# Small blocks, so that modest test files already take the chunked (Put Block) path.
TEST_CHUNK_BYTES = 64 * 1024


def azure_config(azurite: Azurite, container: str | None = None, **overrides: object) -> AzureBlobConfig:
    """An enabled Azure provider config on ``azurite`` with a fresh container (unless named): small chunks,
    so a file of a few chunks moves as blocks and ranges; ``maxsingleputbytes=0`` keeps files above one
    chunk on the block path, which most tests here are about (those of the streamed Put Blob set it)."""
    settings: dict = dict(enabled=True, containername=container or f"c{uuid.uuid4().hex[:20]}",
                          connectionstring=azurite.connection_string(), chunkbytes=TEST_CHUNK_BYTES,
                          maxsingleputbytes=0,
                          connecttimeoutseconds=5.0, readtimeoutseconds=10.0)
    settings.update(overrides)
    return AzureBlobConfig(**settings)


async def peak_requests_in_flight(store: Any, folder: Path, data: dict[str, bytes], hold_seconds: float,
                                  patch: Callable[[Any, str, Any], None]) -> tuple[int, int]:
    """Upload ``data`` (``{name: bytes}``, all files at once) through the Azure ``store`` into keys
    ``k/{name}``, then download them back into ``folder/in``, and return the most block uploads and
    range downloads that were open at once, ``(up, down)``. Each SDK request is held ``hold_seconds``
    longer so overlaps show; ``patch(obj, name, value)`` replaces the SDK's methods (pytest's
    ``monkeypatch.setattr``). Asserts every byte came back; closes ``store``."""
    from azure.storage.blob.aio import BlobClient

    from sidecar.providers.azureblob.rest import BlobRest

    in_flight = peak = 0

    def counted(method: Any) -> Any:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await asyncio.sleep(hold_seconds)
                return await method(*args, **kwargs)
            finally:
                in_flight -= 1
        return wrapper

    patch(BlobClient, "stage_block", counted(BlobClient.stage_block))
    patch(BlobRest, "get", counted(BlobRest.get))  # every request of a download
    for name, content in data.items():
        (folder / name).write_bytes(content)
    try:
        infos = await asyncio.gather(*(store.upload(folder / name, f"k/{name}") for name in data))
        up, peak = peak, 0
        await asyncio.gather(*(store.download(f"k/{name}", folder / "in" / name, info)
                               for name, info in zip(data, infos)))
    finally:
        await store.close()
    assert all((folder / "in" / name).read_bytes() == content for name, content in data.items())
    return up, peak


H = TypeVar("H", bound=BaseHTTPRequestHandler)


def connection_string_to(url: str) -> str:
    """A connection string of the development account whose blob endpoint is ``url`` (a proxy in front
    of Azurite, signing with the account key as Azurite checks it)."""
    return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};BlobEndpoint={url};"


@contextmanager
def proxy_in_front(azurite: Azurite, handler: type[H]) -> Iterator[type[H]]:
    """Serve a subclass of ``handler`` (a request handler forwarding to port ``upstream``, set here to
    Azurite's) on a free loopback port, in a thread, until the block ends; yields the subclass, whose
    ``url`` is the development account's endpoint through it (for :func:`connection_string_to`)."""
    served = type("Handler", (handler,), {"upstream": azurite.port})
    server = ThreadingHTTPServer(("127.0.0.1", 0), served)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    served.url = f"http://127.0.0.1:{server.server_port}/{ACCOUNT}"
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
