"""``--azureblobprovider.*``: the settings of the Azure Blob store and their validation (Azure's naming
rules for containers, connection strings, and which credential needs what).

The ``#`` comment above each field is its help text in the flag reference (``sidecar.flags``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from sidecar.bounds import KiB, MiB, Bounds
from sidecar.dataplane.credentials import USER_DELEGATION_MAX_SECONDS, CredentialKind, check_token_settings
from sidecar.errors import SettingsError

# Azure's container names: 3-63 lowercase letters, digits and single hyphens, starting and ending with
# a letter or digit ("Naming and Referencing Containers, Blobs, and Metadata").
CONTAINER_NAME = re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")


@dataclass
class AzureBlobConfig:
    """``--azureblobprovider``: Azure Blob Storage through adlfs. Off: blobs on disk under devdir."""

    SECRETS: ClassVar[tuple[str, ...]] = ("blobaccountkey", "connectionstring")
    REQUIRED: ClassVar[tuple[str, ...]] = ("containername",)
    # chunkbytes: Azure's largest block is 4000 MiB ("Put Block", version 2019-12-12 and later). The
    # floor of 64 KiB is ours: each block or range is one HTTP request whose headers, TLS records and
    # round trip cost about as much as kilobytes of data, so smaller chunks multiply requests (and
    # their retries) for no gain; 64 KiB is also a common socket read size.
    BOUNDS: ClassVar[dict[str, Bounds]] = {
        "sasexpiryseconds": Bounds(0, unit="s"),
        "chunkbytes": Bounds(64 * KiB, 4000 * MiB, unit="bytes"),
        "inflightbytes": Bounds(64 * KiB, at_least="chunkbytes", unit="bytes"),
        "connecttimeoutseconds": Bounds(0, above=True, unit="s"),
        "readtimeoutseconds": Bounds(0, above=True, unit="s"),
        "minbytespersecond": Bounds(1, unit="bytes/s"),
        # maxsingleputbytes: Put Blob takes 256 MiB in every service version (5000 MiB only from version
        # 2019-12-12 on); one request that large has no parallelism anyway, blocks do better above it.
        "maxsingleputbytes": Bounds(0, 256 * MiB, unit="bytes"),
    }

    enabled: bool = False
    # The storage account's name.
    blobaccountname: str = ""
    # The storage account's access key.
    blobaccountkey: str = ""
    # The blob container all blobs go to.
    containername: str = ""
    # Azurite or any non-default endpoint; when set it wins over name and key.
    connectionstring: str = ""
    # Lifetime of the read-only SAS URL recorded in a child's event meta, seconds (0: none).
    sasexpiryseconds: int = 86400
    # Block size of chunked uploads and range size of downloads, bytes. 8 MiB, not 4: Azure(ite) spends
    # its CPU per request, and on a shared machine 4 MiB ranges cost it 2.0 s per 512 MiB against 0.8 s
    # (bench/azure_transfers_results.md).
    chunkbytes: int = 8 * 1024 * 1024
    # Files larger than chunkbytes and at most this size go up as one Put Blob streamed from the file, its
    # MD5 checked by the service (hashed once; blocks are hashed twice); larger files as blocks of
    # chunkbytes in parallel, bytes (0: always blocks). 64 MiB: azure-storage-blob's max_single_put_size.
    maxsingleputbytes: int = 64 * 1024 * 1024
    # Most bytes of file data held in memory by all transfers at once (blocks and ranges in flight):
    # three 8 MiB requests; tests/azure's memory test measures the rise it allows (109-110 MiB).
    inflightbytes: int = 24 * 1024 * 1024
    # Deadline to open a connection to the blob service, seconds.
    connecttimeoutseconds: float = 10.0
    # Deadline between two reads of a blob service response, seconds (the total per request: minbytespersecond).
    readtimeoutseconds: float = 60.0
    # Slowest speed a blob request may move its bytes at, bytes per second: each request must end within
    # connecttimeoutseconds + readtimeoutseconds + its bytes / this (64 KiB/s: 198 s for an 8 MiB block).
    minbytespersecond: int = 64 * 1024
    # key: account key or connection string; default, managedidentity, workloadidentity: Entra ID token.
    credential: CredentialKind = CredentialKind.key
    # Client id of the user-assigned managed identity or workload identity (token credentials only).
    clientid: str = ""
    # Blob endpoint for token credentials; empty: https://{blobaccountname}.blob.core.windows.net.
    accounturl: str = ""

    def check(self) -> None:
        """Refuse settings that cannot work (called only when the provider is on).

        Raises:
            SettingsError: naming the flag: no way to sign in, a token credential mixed with a key or
                missing its account, an accounturl that is not https, a SAS lifetime a user-delegation
                key cannot cover, a container name Azure refuses, a connection string that is not one.
                The numbers' ranges (``BOUNDS``) are checked by the registry before this is called.
        """
        if self.credential is not CredentialKind.key:
            self._check_token_settings()
        elif self.clientid or self.accounturl:
            raise SettingsError(f"--azureblobprovider.{'clientid' if self.clientid else 'accounturl'} needs a token "
                                "credential (--azureblobprovider.credential=default|managedidentity|workloadidentity)")
        elif not self.connectionstring and not (self.blobaccountname and self.blobaccountkey):
            raise SettingsError("--azureblobprovider=true needs --azureblobprovider.blobaccountname and "
                                ".blobaccountkey, or --azureblobprovider.connectionstring")
        if not CONTAINER_NAME.fullmatch(self.containername):
            raise SettingsError(f"--azureblobprovider.containername={self.containername} is not a container name "
                                "(3-63 lowercase letters, digits and single hyphens, Azure's naming rules)")
        if self.connectionstring:
            self._check_connection_string()

    def _check_connection_string(self) -> None:
        """Parse ``connectionstring`` as the provider will (azure-core's parser, then azure-storage-blob's
        ``from_connection_string``, which opens no connection), so a string the SDK refuses (blanks
        around ';', no account details) stops start-up with one line instead of a traceback later. The
        SDKs' messages are not shown (they may quote the string)."""
        from azure.core.utils import parse_connection_string
        from azure.storage.blob import BlobServiceClient

        try:
            parse_connection_string(self.connectionstring, case_sensitive_keys=False)
            BlobServiceClient.from_connection_string(self.connectionstring).close()
        except (ValueError, TypeError):
            raise SettingsError("--azureblobprovider.connectionstring is not a connection string azure-storage-blob "
                                "accepts (Key=Value pairs separated by ';' without blanks, with AccountName and "
                                "AccountKey, or SharedAccessSignature, and an endpoint)") from None

    def _check_token_settings(self) -> None:
        check_token_settings("azureblobprovider", self.credential, self.clientid,
                             {"connectionstring": self.connectionstring, "blobaccountkey": self.blobaccountkey})
        if not self.accounturl and not self.blobaccountname:
            raise SettingsError(f"--azureblobprovider.credential={self.credential.value} needs "
                                "--azureblobprovider.blobaccountname or --azureblobprovider.accounturl")
        if self.accounturl and not re.fullmatch(r"https://[^/?#\s]+(/[^?#\s]*)?", self.accounturl):
            # Bearer tokens travel only over TLS (Azure Storage and azure-core refuse them over http).
            raise SettingsError(f"--azureblobprovider.accounturl={self.accounturl} is not an https:// URL "
                                "(tokens are sent only over TLS)")
        if self.sasexpiryseconds > USER_DELEGATION_MAX_SECONDS:
            raise SettingsError(f"--azureblobprovider.sasexpiryseconds={self.sasexpiryseconds} exceeds 7 days "
                                f"({USER_DELEGATION_MAX_SECONDS} s), the longest a user-delegation SAS may last")
