"""An example module, as in the original Ion example: stage inputs, write outputs, commit.

Run beside a sidecar (``scripts/dev`` starts one): ``SHARED_SECRET=dev-secret SIDECAR_BASEDIR=./ion
python examples/module.py``. It reports what it received, writes ``FILES`` output files (default 5)
in a subfolder, one ``file_discovered`` event per file and an insight, then calls ``/done`` and prints
the events the sidecar published.
"""

from __future__ import annotations

import hashlib
import json
import os

from ion_sidecar_client import SidecarClient


def main() -> None:
    client = SidecarClient()
    staged = client.ready()
    received = sorted(p.relative_to(client.layout.in_data).as_posix()
                      for p in client.layout.in_data.rglob("*") if p.is_file())
    print(json.dumps({"ready": staged, "inputs": received, "meta": client.input_meta()}))
    count = int(os.environ.get("FILES", "5"))
    for i in range(count):
        path = f"found/file{i}.txt"
        content = f"file {i} of event {os.environ.get('EVENT_LABEL', 'example')}\n".encode() * (i + 1)
        client.write_file(path, content)
        client.write_event(f"event{i}", os.environ.get("EVENT_TYPE", "file_discovered"), [path],
                           sha1=hashlib.sha1(content).hexdigest(), index=str(i))
    client.write_insight(files=str(count), inputs=str(len(received)))
    print(json.dumps({"done": client.done()}))


if __name__ == "__main__":
    main()
