"""Imported at start-up by a Python process whose ``PYTHONPATH`` holds this folder (``site`` imports
``sitecustomize``): with ``SIDECAR_TEST_HTTP_LOG`` set, every request sent through httpx (the Prefect
client's transport) is appended to that file as one line ``THREAD METHOD PATH``, so a test can see
which requests a sidecar made, from which thread and in which order, without changing its code."""

import os

if os.environ.get("SIDECAR_TEST_HTTP_LOG"):
    import threading

    import httpx

    _log = open(os.environ["SIDECAR_TEST_HTTP_LOG"], "a", buffering=1)
    _send_async, _send_sync = httpx.AsyncClient.send, httpx.Client.send

    async def _logged_async(self, request, **kwargs):
        _log.write(f"{threading.current_thread().name} {request.method} {request.url.path}\n")
        return await _send_async(self, request, **kwargs)

    def _logged_sync(self, request, **kwargs):
        _log.write(f"{threading.current_thread().name} {request.method} {request.url.path}\n")
        return _send_sync(self, request, **kwargs)

    httpx.AsyncClient.send = _logged_async
    httpx.Client.send = _logged_sync
