"""hash: one run per ``file_discovered`` event. Hashes the one file it received (SHA-256), writes the
digest beside it and publishes a ``file_hashed`` event carrying both files and the digest."""

from __future__ import annotations

import hashlib

from ion_sidecar_client import SidecarClient


def main() -> None:
    client = SidecarClient()
    client.ready()
    meta = client.input_meta()
    path = meta["path"]
    data = client.input_path(path).read_bytes()
    if len(data) != int(meta["size"]):
        raise SystemExit(f"{path}: {len(data)} bytes staged, the event says {meta['size']}")
    digest = hashlib.sha256(data).hexdigest()
    client.write_file(path, data)
    client.write_file(f"{path}.sha256", f"{digest}  {path}\n".encode())
    client.write_event("hashed", "file_hashed", [path, f"{path}.sha256"], path=path, sha256=digest)
    client.write_insight(path=path, sha256=digest)
    client.done()


if __name__ == "__main__":
    main()
