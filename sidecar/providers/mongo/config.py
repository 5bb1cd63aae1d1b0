"""``--mongodbdocprovider.*``: the settings of the MongoDB document store and their validation.

The ``#`` comment above each field is its help text in the flag reference (``sidecar.flags``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sidecar.bounds import Bounds
from sidecar.errors import SettingsError


@dataclass
class MongoConfig:
    """``--mongodbdocprovider``: MongoDB (or Cosmos DB's API for MongoDB). Off: JSON files."""

    SECRETS: ClassVar[tuple[str, ...]] = ("password", "uri")
    REQUIRED: ClassVar[tuple[str, ...]] = ("collection",)
    # pymongo takes the timeouts in milliseconds and refuses negative ones (a 0 would mean "none").
    BOUNDS: ClassVar[dict[str, Bounds]] = {
        "port": Bounds(1, 65535),
        "serverselectiontimeoutseconds": Bounds(0, above=True, unit="s"),
        "connecttimeoutseconds": Bounds(0, above=True, unit="s"),
        "sockettimeoutseconds": Bounds(0, above=True, unit="s"),
    }

    enabled: bool = False
    # The Cosmos DB account (and database) name.
    name: str = ""
    # The Cosmos DB account's key or the MongoDB user's password.
    password: str = ""
    # The collection that holds event metas and insights.
    collection: str = "ion"
    # The Cosmos DB MongoDB API port.
    port: int = 10255
    # A full MongoDB URI for self-hosted Mongo; without it name/password/port mean Cosmos DB over TLS.
    uri: str = ""
    # The Cosmos DB host; {name} is replaced by the account name.
    host: str = "{name}.documents.azure.com"
    # How long to wait for a usable MongoDB server before a call fails, seconds.
    serverselectiontimeoutseconds: float = 10.0
    # How long opening a connection may take, seconds.
    connecttimeoutseconds: float = 10.0
    # How long one call may take in all, seconds: pymongo's timeoutMS (finding a server, connecting, the whole answer).
    sockettimeoutseconds: float = 30.0

    def check(self) -> None:
        """Refuse settings that cannot connect (called only when the provider is on, after its numbers
        were checked against ``BOUNDS`` by ``sidecar.dataplane.registry.check``).

        Raises:
            SettingsError: naming the flags to set, or a URI or collection name pymongo refuses.
        """
        if not self.uri and not (self.name and self.password):
            raise SettingsError("--mongodbdocprovider=true needs --mongodbdocprovider.name and .password, "
                                "or --mongodbdocprovider.uri")
        self._check_with_pymongo()

    def _check_with_pymongo(self) -> None:
        """Parse the URI the provider will connect with (``uri``, or the Cosmos DB one built from
        name/password/host/port) with pymongo's own parser, and the collection names with pymongo's
        rules, so what pymongo would refuse on the first /ready or /done stops start-up instead. A
        ``mongodb+srv://`` URI is not parsed here: pymongo resolves its DNS records while parsing.
        pymongo's messages are not shown (they may quote the URI, which holds the password)."""
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError
        from pymongo.uri_parser import parse_uri

        from sidecar.providers.mongo.store import INSIGHTS_SUFFIX, cosmos_uri

        flag = "uri" if self.uri else "host"
        uri = self.uri or cosmos_uri(self)
        try:
            if not uri.startswith("mongodb+srv://"):
                parse_uri(uri, warn=True)
        except (PyMongoError, ValueError):
            raise SettingsError(f"--mongodbdocprovider.{flag} does not make a MongoDB URI pymongo accepts "
                                "(mongodb://[USER:PASSWORD@]HOST[:PORT]/[DATABASE][?OPTIONS], user and password "
                                "percent-escaped; pymongo's parse_uri)") from None
        client: MongoClient = MongoClient("mongodb://127.0.0.1/", connect=False)  # no I/O: only names are checked
        try:
            for name in (self.collection, self.collection + INSIGHTS_SUFFIX):
                client["ion"][name]
        except (PyMongoError, ValueError):
            raise SettingsError(f"--mongodbdocprovider.collection={self.collection!r} is not a collection name "
                                "MongoDB accepts (not empty, no '$' or NUL, not starting or ending with '.')") from None
        finally:
            client.close()
