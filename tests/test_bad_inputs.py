"""Bad outputs through a real sidecar process: each is a 400 naming the file, nothing is committed,
and the retry after fixing the outputs publishes exactly the good events."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from testsupport.outputs import BAD_EVENTS, pairs
from testsupport.processes import SidecarProcess, dev_args


def committed(dev: Path) -> list[str]:
    """Every file the data plane holds (blobs, documents, events), relative to .dev."""
    return sorted(p.relative_to(dev).as_posix() for p in dev.rglob("*") if p.is_file()) if dev.exists() else []


def test_each_bad_output_is_rejected_before_anything_is_committed(tmp_path: Path) -> None:
    with SidecarProcess(tmp_path, dev_args("evt-bad", "corr-bad", "mod", types="file_discovered,face_detected")
                        + ["--maxeventbytes=1024"]) as sidecar:
        sidecar.wait_healthy()
        assert sidecar.get("/ready").status_code == 200
        out = sidecar.basedir / "out"
        dev = tmp_path / ".dev"
        before = committed(dev)

        def reset() -> None:
            shutil.rmtree(out)
            (out / "events").mkdir(parents=True)
            (out / "data" / "sub").mkdir(parents=True)
            (out / "data" / "sub" / "a.txt").write_text("a")
            (out / "events" / "0-good.json").write_text(json.dumps(pairs(eventType="file_discovered", files="sub/a.txt")))

        cases: list[tuple[str, str]] = []
        for case, content, expected in BAD_EVENTS:
            reset()
            (out / "events" / "bad.json").write_text(content if isinstance(content, str) else json.dumps(content))
            cases.append((case, expected))
            answer = sidecar.get("/done")
            assert answer.status_code == 400, (case, answer.text)
            body = answer.json()
            assert body["statusCode"] == 400 and body["message"].startswith("out/events/bad.json"), (case, body)
            assert expected in body["message"], (case, body)
            assert committed(dev) == before, case

        reset()
        (out / "meta.json").write_text("{not json")
        answer = sidecar.get("/done")
        assert answer.status_code == 400 and answer.json()["message"].startswith("out/meta.json: malformed JSON")

        reset()
        outside = tmp_path / "outside.txt"
        outside.write_text("private")
        os.symlink(outside, out / "data" / "leak.txt")
        answer = sidecar.get("/done")
        assert answer.status_code == 400 and "out/data/leak.txt" in answer.json()["message"]
        assert committed(dev) == before

        reset()
        (out / "events" / "1-face.json").write_text(json.dumps(pairs(eventType="face_detected", who="x")))
        good = sidecar.get("/done")
        assert good.status_code == 200, good.text
        events = good.json()["events"]
        assert [e["eventType"] for e in events] == ["file_discovered", "face_detected"]
        published = sorted(p.stem for p in (dev / "events").glob("*.json"))
        assert published == sorted(e["eventId"] for e in events)
        blobs = [p for p in committed(dev) if p.startswith("blobs/")]
        assert blobs == ["blobs/evt-bad/mod/sub/a.txt"]
