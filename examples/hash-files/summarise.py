"""summarise: one run per ``file_hashed`` event. Checks that the file it received still has the digest
its parent computed and stores a summary insight (path, bytes, digest, verified)."""

from __future__ import annotations

import hashlib

from ion_sidecar_client import SidecarClient


def main() -> None:
    client = SidecarClient()
    client.ready()
    meta = client.input_meta()
    path = meta["path"]
    data = client.input_path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["sha256"]:
        raise SystemExit(f"{path}: SHA-256 {digest}, its parent computed {meta['sha256']}")
    client.write_insight(path=path, bytes=str(len(data)), sha256=digest, verified="true")
    client.done()
    print(f"{path}: {len(data)} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
