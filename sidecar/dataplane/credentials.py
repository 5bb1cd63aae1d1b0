"""Microsoft Entra ID token credentials of the Azure providers (blob storage and Service Bus).

Shared by the Azure providers (``sidecar.providers.azureblob`` and ``sidecar.providers.servicebus``), as
Dapr's components share one Azure auth chain. ``--azureblobprovider.credential`` and
``--servicebuseventprovider.credential`` choose how a provider signs in (:class:`CredentialKind`):

- ``key``: the account key, SAS rule key or connection string (the emulators' way; the default);
- ``default``: ``azure-identity``'s ``DefaultAzureCredential`` chain (environment, workload identity,
  managed identity, developer tools), ``clientid`` choosing the user-assigned identity;
- ``managedidentity``: ``ManagedIdentityCredential`` (IMDS on a VM or AKS node, the App Service style
  ``IDENTITY_ENDPOINT``/``IDENTITY_HEADER`` endpoint, Azure Arc, ...), ``clientid`` for a
  user-assigned identity, else the system-assigned one;
- ``workloadidentity``: ``WorkloadIdentityCredential`` (AKS workload identity: the webhook sets
  ``AZURE_TENANT_ID``, ``AZURE_CLIENT_ID`` and ``AZURE_FEDERATED_TOKEN_FILE``), ``clientid`` overriding
  ``AZURE_CLIENT_ID``.

Every token credential is wrapped in :class:`ProviderCredential`, so a credential that cannot get a
token surfaces as :class:`~sidecar.errors.DataPlaneUnavailable` (HTTP 503, retried by the task) naming
the provider and the credential type, and never the token or the identity endpoint's secret.
Source: azure-identity 1.x (``azure.identity.aio``), "Authenticate Azure-hosted apps" in its README.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import Enum
from typing import Any

from azure.core.credentials import AccessToken
from azure.core.credentials_async import AsyncTokenCredential

from sidecar.errors import DataPlaneUnavailable, SettingsError


class CredentialKind(str, Enum):
    """How an Azure provider signs in: its key or connection string, or a Microsoft Entra ID token
    credential from azure-identity."""

    key = "key"
    default = "default"
    managedidentity = "managedidentity"
    workloadidentity = "workloadidentity"


# A user-delegation key, and so a SAS signed with it, lasts at most 7 days (Get User Delegation Key).
USER_DELEGATION_MAX_SECONDS = 7 * 24 * 3600
# What WorkloadIdentityCredential reads from the environment (set by AKS's workload identity webhook).
WORKLOAD_ENV = ("AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE")

_NAMES = {
    CredentialKind.default: "DefaultAzureCredential",
    CredentialKind.managedidentity: "ManagedIdentityCredential",
    CredentialKind.workloadidentity: "WorkloadIdentityCredential",
}


def settings_problem(provider: str, kind: CredentialKind, clientid: str,
                     environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the token credential settings of ``provider`` cannot work, in one line, or None.

    Args:
        provider: the flag prefix, e.g. ``"azureblobprovider"``.
        kind: the chosen credential; ``clientid``: the identity's client id ('' for none).
        environ: the environment the credential will read (workload identity needs its variables).
    """
    if kind is CredentialKind.workloadidentity:
        missing = [name for name in WORKLOAD_ENV if not environ.get(name)]
        if not clientid and not environ.get("AZURE_CLIENT_ID"):
            missing.append("AZURE_CLIENT_ID")
        if missing:
            return (f"--{provider}.credential=workloadidentity needs {', '.join(missing)} in the environment "
                    f"(set by AKS workload identity; --{provider}.clientid may replace AZURE_CLIENT_ID)")
    return None


def check_token_settings(provider: str, kind: CredentialKind, clientid: str, keys: dict[str, str],
                         environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a token credential ``kind`` of ``provider`` combined with key settings (``keys``: the
    provider's key settings by field name, e.g. ``{"key": cfg.key}``), or missing its environment.

    Raises:
        SettingsError: naming the flag (never a value).
    """
    given = [name for name, value in keys.items() if value]
    if given:
        raise SettingsError(f"--{provider}.credential={kind.value} signs in with Microsoft Entra ID: drop "
                            f"--{provider}.{given[0]} (or use --{provider}.credential=key)")
    problem = settings_problem(provider, kind, clientid, environ)
    if problem:
        raise SettingsError(problem)


def token_credential(kind: CredentialKind, clientid: str, store: str) -> ProviderCredential:
    """The asynchronous token credential ``kind`` (not ``key``), wrapped for the provider ``store``.

    Args:
        kind: ``default``, ``managedidentity`` or ``workloadidentity``.
        clientid: the user-assigned managed identity's or the app registration's client id, or ''.
        store: the building block named in error messages, e.g. ``"blob store"``.

    Raises:
        ValueError: ``kind`` is ``key``, or azure-identity refuses the settings (e.g. workload identity
            without its environment variables).
    """
    from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential, WorkloadIdentityCredential

    client = clientid or None
    inner: AsyncTokenCredential
    if kind is CredentialKind.default:
        # Only when given: passing None would override the chain's AZURE_CLIENT_ID default.
        inner = DefaultAzureCredential(**({"managed_identity_client_id": client} if client else {}))
    elif kind is CredentialKind.managedidentity:
        inner = ManagedIdentityCredential(client_id=client)
    elif kind is CredentialKind.workloadidentity:
        inner = WorkloadIdentityCredential(client_id=client)
    else:
        raise ValueError(f"credential '{kind.value}' is not a token credential")
    return ProviderCredential(inner, _NAMES[kind], store)


class ProviderCredential(AsyncTokenCredential):
    """An ``AsyncTokenCredential`` whose failure to get a token is a :class:`DataPlaneUnavailable`.

    The SDKs call :meth:`get_token` inside a request (azure-storage-blob's bearer token policy,
    azure-servicebus's CBS put-token), so the error raised here is what the provider reports.

    Args:
        inner: the azure-identity credential; ``name``: its type, shown in errors; ``store``: the building block.
    """

    def __init__(self, inner: AsyncTokenCredential, name: str, store: str):
        self.inner = inner
        self.name = name
        self.store = store
        self._closed = False

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        """A token for ``scopes`` (cached and refreshed by azure-identity).

        Raises:
            DataPlaneUnavailable: the credential could not get a token (no identity endpoint, the
                identity refused, ...): names the credential type and the scope, never a secret.
        """
        try:
            return await self.inner.get_token(*scopes, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure to get a token is the same answer
            raise DataPlaneUnavailable(
                self.store, f"{self.name} could not get a token for {', '.join(scopes)}: {type(exc).__name__}"
                            f"{_reason(exc)}") from None

    async def close(self) -> None:
        """Close the credential's HTTP session (once; later calls do nothing)."""
        if not self._closed:
            self._closed = True
            await self.inner.close()

    async def __aexit__(self, *args: Any) -> None:
        await self.close()


def _reason(exc: BaseException) -> str:
    """The first sentence of azure-identity's message (it names what is missing, not secrets)."""
    text = str(getattr(exc, "message", None) or exc).strip()
    first = text.splitlines()[0] if text else ""
    first = first.split(". ")[0][:200]
    return f": {first}" if first else ""
