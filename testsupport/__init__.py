"""What the tests and the benchmarks share: the real services they start and the helpers that drive them.

Importable without pytest (``bench/`` uses it too); fixtures that wrap these live in ``tests/conftest.py``
and the folders' ``conftest.py``, and nothing here imports a test module.

- ``processes``: free ports, waiting for HTTP, stopping process groups, the Prefect server (SQLite or a
  temporary PostgreSQL cluster), a real ``sidecar`` process, the example module, Prefect run history.
- ``azurite``: Azurite (the Azure Storage emulator from npm) on loopback, HTTP or HTTPS with OAuth.
- ``mongo``: nx-27017, a MongoDB wire-protocol server over SQLite.
- ``amqp_peer``: an AMQP 1.0 peer standing in for the Service Bus emulator (SAS and JWT on ``$cbs``).
- ``servicebus``: reading back what a subscription received, a TCP listener that never answers, events.
- ``identity``: a managed identity endpoint issuing signed JWTs, and self-signed TLS files.
- ``faults``: a fault-injecting TCP proxy between the sidecar and one service.
- ``stack``: Azurite, nx-27017 and the AMQP peer at once, each behind a fault proxy.
- ``runtime``: in-process runtimes (development providers, or a stack) and module outputs to commit.
- ``hostile``: the hostile-input corpus (names, paths, encodings, links, JSON shapes) and its answers.
- ``outputs``: malformed event files with the message each must produce.
- ``blocking``: a synchronous face of an asynchronous provider (the document store) for plain tests.
"""
