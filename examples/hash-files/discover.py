"""discover: the first module of the example graph. Lists the files the seed event carried into
in/data and publishes one ``file_discovered`` event per file (a fan-out), passing each file on."""

from __future__ import annotations

from ion_sidecar_client import SidecarClient


def main() -> None:
    client = SidecarClient()
    client.ready()
    label = client.input_meta().get("label", "")
    files = client.input_files()
    for i, path in enumerate(files):
        data = client.input_path(path).read_bytes()
        client.write_file(path, data)
        client.write_event(f"file{i}", "file_discovered", [path], path=path, size=str(len(data)), label=label)
    client.write_insight(files=str(len(files)))
    client.done()


if __name__ == "__main__":
    main()
