"""``--servicebuseventprovider.*``: the settings of the Azure Service Bus publisher and their validation.

The ``#`` comment above each field is its help text in the flag reference (``sidecar.flags``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sidecar.bounds import Bounds
from sidecar.dataplane.credentials import CredentialKind, check_token_settings
from sidecar.errors import SettingsError


@dataclass
class ServiceBusConfig:
    """``--servicebuseventprovider``: Azure Service Bus topics. Off: events written as files."""

    SECRETS: ClassVar[tuple[str, ...]] = ("key", "connectionstring")
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    BOUNDS: ClassVar[dict[str, Bounds]] = {"publishtimeoutseconds": Bounds(0, above=True, unit="s")}

    enabled: bool = False
    # The Service Bus namespace (the host is {namespace}.servicebus.windows.net).
    namespace: str = ""
    # The topic child events are published to.
    topic: str = ""
    # The shared access key of the authorization rule.
    key: str = ""
    # The shared access policy (authorization rule) the key belongs to.
    authorizationrulename: str = ""
    # The emulator or a SAS connection string; when set it wins over namespace/key/rule.
    connectionstring: str = ""
    # Deadline for the whole publish step of one /done (every batch, task retries included), seconds.
    publishtimeoutseconds: float = 30.0
    # key: SAS rule key or connection string; default, managedidentity, workloadidentity: Entra ID token.
    credential: CredentialKind = CredentialKind.key
    # Client id of the user-assigned managed identity or workload identity (token credentials only).
    clientid: str = ""

    def check(self) -> None:
        """Refuse settings that cannot sign in (called only when the provider is on, after its numbers
        were checked against ``BOUNDS`` by ``sidecar.dataplane.registry.check``).

        Raises:
            SettingsError: naming the flags (a token credential mixed with a key, workload identity
                without its environment, a client id without a token credential, no way to sign in, a
                connection string azure-servicebus refuses).
        """
        if self.credential is not CredentialKind.key:
            check_token_settings("servicebuseventprovider", self.credential, self.clientid,
                                 {"connectionstring": self.connectionstring, "key": self.key})
            if not self.namespace:
                raise SettingsError(f"--servicebuseventprovider.credential={self.credential.value} needs "
                                    "--servicebuseventprovider.namespace")
        elif self.clientid:
            raise SettingsError("--servicebuseventprovider.clientid needs a token credential "
                                "(--servicebuseventprovider.credential=default|managedidentity|workloadidentity)")
        elif not self.connectionstring and not (self.namespace and self.key and self.authorizationrulename):
            raise SettingsError("--servicebuseventprovider=true needs --servicebuseventprovider.namespace, .key and "
                                ".authorizationrulename, or --servicebuseventprovider.connectionstring")
        else:
            self._check_connection_string()

    def _check_connection_string(self) -> None:
        """Parse the SAS connection string the publisher will use (given, or built from namespace, rule
        and key) with azure-servicebus's own parser, so what the SDK would refuse on the first /done
        (after its blobs and event metas were committed) stops start-up instead. The SDK's message
        names no secret, but it is not shown: the flag and the rule are enough."""
        from azure.servicebus import parse_connection_string

        from sidecar.providers.servicebus.publisher import connection_string

        flag = "connectionstring" if self.connectionstring else "namespace"
        try:
            parse_connection_string(connection_string(self))
        except ValueError:
            raise SettingsError(f"--servicebuseventprovider.{flag} does not make a Service Bus connection string "
                                "(Endpoint=sb://HOST/;SharedAccessKeyName=RULE;SharedAccessKey=KEY, azure-servicebus's "
                                "parse_connection_string)") from None
