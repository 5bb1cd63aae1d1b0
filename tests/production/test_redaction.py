"""No log line and no error body carries a secret, in whatever form a library or a service shows it:
the sidecar's filter (``sidecar.logs.ContextFilter``) masked only the whole secret values it was given,
so an ``AccountKey=``, ``SharedAccessKey=``, SAS ``sig=`` or a MongoDB URI's password in another
connection-string order or percent-encoded went through (hostile trial)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from sidecar.api import create_app
from sidecar.cli import compose_config
from sidecar.config import secret_values
from sidecar.errors import DataPlaneError, DataPlaneUnavailable, InputError
from sidecar.logs import ContextFilter
from testsupport.azurite import ACCOUNT_KEY
from testsupport.processes import SECRET
from testsupport.runtime import H, dev_runtime

BASE = ["--context.eventid=e1", "--context.correlationid=c1", f"--sharedsecret={SECRET}"]
STORAGE_KEY = "Q2hhbmdlZEtleQ+/AbCdEfGh0123456789+/ZZ=="
BUS_KEY = "YnVzLWtleS1zZWNyZXQ+/0123456789AbCd="
MONGO_PW = "p@ss:w0rd/Secret%"  # needs percent-encoding in a URI
OTHER_SIG = "c2lnbmF0dXJlLW5ldmVyLWdpdmVu%2B%2F%3D"  # a SAS signature the sidecar was never given

# Per provider: the flags that give the secret, and texts that show it in another form.
CASES = {
    "azure blob connection string": (
        ["--azureblobprovider=true", "--azureblobprovider.containername=ion",
         f"--azureblobprovider.connectionstring=DefaultEndpointsProtocol=http;AccountName=dev;AccountKey={STORAGE_KEY};"
         "BlobEndpoint=http://127.0.0.1:1/dev"],
        [f"AccountKey={STORAGE_KEY};AccountName=dev", f"accountkey = {quote(STORAGE_KEY, safe='')}",
         f"the key {quote(STORAGE_KEY, safe='')} quoted", f"https://dev.blob/c/x?sv=2024-08-04&sig={OTHER_SIG}&se=1"],
        [STORAGE_KEY, quote(STORAGE_KEY, safe=""), OTHER_SIG]),
    "azure blob account key": (
        ["--azureblobprovider=true", "--azureblobprovider.containername=ion", "--azureblobprovider.blobaccountname=dev",
         f"--azureblobprovider.blobaccountkey={STORAGE_KEY}"],
        [f"DefaultEndpointsProtocol=https;AccountKey={STORAGE_KEY}", f"key%3D{quote(STORAGE_KEY, safe='')}"],
        [STORAGE_KEY, quote(STORAGE_KEY, safe="")]),
    "service bus connection string": (
        ["--servicebuseventprovider=true", "--servicebuseventprovider.topic=t",
         f"--servicebuseventprovider.connectionstring=Endpoint=sb://h.servicebus.windows.net/;"
         f"SharedAccessKeyName=Root;SharedAccessKey={BUS_KEY}"],
        [f"SharedAccessKeyName=Root;SharedAccessKey={BUS_KEY};Endpoint=sb://h/",
         f"SharedAccessSignature sr=sb%3A%2F%2Fh%2Ft&sig={OTHER_SIG}&se=1700000000&skn=Root",
         f"SharedAccessKey={quote(BUS_KEY, safe='')}"],
        [BUS_KEY, quote(BUS_KEY, safe=""), OTHER_SIG]),
    "service bus rule key": (
        ["--servicebuseventprovider=true", "--servicebuseventprovider.topic=t", "--servicebuseventprovider.namespace=h",
         "--servicebuseventprovider.authorizationrulename=Root", f"--servicebuseventprovider.key={BUS_KEY}"],
        [f"Endpoint=sb://h/;SharedAccessKeyName=Root;SharedAccessKey={BUS_KEY}", quote(BUS_KEY, safe="")],
        [BUS_KEY, quote(BUS_KEY, safe="")]),
    "mongodb uri": (
        ["--mongodbdocprovider=true", f"--mongodbdocprovider.uri=mongodb://ion:{quote(MONGO_PW, safe='')}@127.0.0.1:1/"],
        [f"mongodb://ion:{MONGO_PW}@127.0.0.1:1/", f"mongodb%3A%2F%2Fion%3A{quote(quote(MONGO_PW, safe=''), safe='')}%40h",
         f"password={MONGO_PW}", "mongodb+srv://other:n0t-Given-pw@cluster.example/"],
        [MONGO_PW, quote(MONGO_PW, safe=""), "n0t-Given-pw"]),
    "mongodb password": (
        ["--mongodbdocprovider=true", "--mongodbdocprovider.uri=mongodb://127.0.0.1:1/",
         "--mongodbdocprovider.name=ion", f"--mongodbdocprovider.password={MONGO_PW}"],
        [f"mongodb://ion:{quote(MONGO_PW, safe='')}@127.0.0.1:1/", f"auth failed for {MONGO_PW}"],
        [MONGO_PW, quote(MONGO_PW, safe="")]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_log_lines_mask_secrets_in_every_form(case: str) -> None:
    flags, texts, needles = CASES[case]
    cfg, _ = compose_config(BASE + flags)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter({}, secret_values(cfg)))
    logger = logging.getLogger(f"test.redaction.{case}")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for text in texts:
            logger.warning("refused: %s", text)
            try:
                raise RuntimeError(f"the SDK said {text}")
            except RuntimeError:
                logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert written.count("***") >= len(texts) * 2, written  # each line really carried a secret
    for needle in needles:
        assert needle not in written, (needle, written)


def test_ordinary_words_stay_readable() -> None:
    cfg, _ = compose_config(BASE + ["--development=true"])
    redact = ContextFilter({}, secret_values(cfg)).redact
    text = "the signature, sig and password fields; designer=x; https://host/path?sv=1 mongodb://host:27017/db"
    assert redact(text) == text


class QuotingBlobs:
    """The development blob store, refusing every upload with a message that quotes a key and a SAS
    signature, as an SDK's or a proxy's message may (the sidecar quotes a service's first line)."""

    def __init__(self, inner, text: str):
        self.inner, self.text = inner, text

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def upload(self, *args, **kwargs):
        raise DataPlaneError("blob store", self.text)


def test_an_error_body_quoting_a_key_is_masked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime = dev_runtime(tmp_path, "--azureblobprovider.blobaccountkey=" + STORAGE_KEY)
    quoted = (f"refused: AccountName=dev;AccountKey={ACCOUNT_KEY} https://x/c/b?sv=1&sig={OTHER_SIG}&se=2 "
              f"key {quote(STORAGE_KEY, safe='')}")
    runtime.dataplane.blobs = QuotingBlobs(runtime.dataplane.blobs, quoted)
    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        (runtime.layout.out_data / "a.txt").write_text("a")
        refused = client.get("/done", headers=H)
    assert refused.status_code == 502, refused.text
    message = json.loads(refused.text)["message"]
    assert message == "blob store error: refused: AccountName=dev;AccountKey=*** https://x/c/b?sv=1&sig=***&se=2 key ***"


@pytest.mark.parametrize("error", [DataPlaneError, DataPlaneUnavailable, InputError])
def test_every_error_message_masks_the_secret_fields(error) -> None:
    # Masked where the message is made, so the flow run's state and the run history (written to the
    # Prefect API, not through the log filter) never hold them either.
    quoted = (f"AccountName=dev;AccountKey={STORAGE_KEY} SharedAccessKey={BUS_KEY}; https://x/c?sig={OTHER_SIG}&se=1 "
              f"mongodb://ion:{quote(MONGO_PW, safe='')}@h/ out/events/a.json")
    message = error("blob store", quoted).message
    for needle in (STORAGE_KEY, BUS_KEY, OTHER_SIG, quote(MONGO_PW, safe="")):
        assert needle not in message
    assert message.count("***") == 4 and "out/events/a.json" in message
