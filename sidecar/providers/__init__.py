"""One package per data-plane provider (the Argo artifact-driver / Dapr component shape).

Each package's ``__init__`` is the provider's whole face to the rest of the sidecar, and imports no
service library (the sidecar's start-up and ``--help`` stay fast):

- ``Config``: its settings, a dataclass whose fields are the flags ``--{flag}.{field}`` (real providers
  only; development providers take none), with ``SECRETS`` (field names redacted everywhere),
  ``REQUIRED`` (fields that must be non-empty when it is on), ``BOUNDS`` (the valid range of every
  numeric field, ``sidecar.bounds``, checked by the registry before ``check()``) and ``check()`` (its
  own validation, raising :class:`~sidecar.errors.SettingsError` naming the flag);
- ``create(settings, devdir)``: the factory, returning the building block's interface
  (``sidecar.dataplane.blobs.BlobStore``, ``.documents.DocumentStore`` or ``.events.EventPublisher``)
  without opening a connection.

``sidecar.dataplane.registry`` lists the packages; nothing else names a provider.
"""
