"""The Azure Service Bus event publisher (``--servicebuseventprovider=true``) on azure-servicebus's
asyncio client (``publisher.py``). Credentials: a SAS rule and key or a connection string, or a
Microsoft Entra ID token credential (``sidecar.dataplane.credentials``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.providers.servicebus.config import ServiceBusConfig as Config

if TYPE_CHECKING:
    from sidecar.providers.servicebus.publisher import ServiceBusEventPublisher


def create(settings: Config, devdir: Path) -> "ServiceBusEventPublisher":
    """The publisher for ``settings``; connections open on the first publish."""
    from sidecar.providers.servicebus.publisher import ServiceBusEventPublisher

    return ServiceBusEventPublisher(settings)
