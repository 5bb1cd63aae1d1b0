"""Which topic a child event goes to, and whether that name can be a Service Bus topic.

``--servicebuseventprovider.topic`` names one topic for every event, or is empty / ``{eventType}``: then
each event goes to the topic named after its event type (Ion's dispatcher subscribes one topic per
event type). Development mode routes the same way (its events are files, but the names are checked as
the real bus would check them), so a module that passes in development mode is not refused in production.

The rules of a Service Bus topic name (Azure resource naming rules, Microsoft.ServiceBus
``namespaces/topics``; ``CreateTopicOptions.Name``: "Max length is 260 chars. Cannot start or end with
a slash. Cannot have restricted characters: '@','?','#','*'"): 1 to 260 characters, ASCII letters,
digits, ``.``, ``-``, ``_`` and ``/``, starting and ending with a letter or digit, no empty path segment.
Names are case-insensitive: ``Found`` and ``found`` are one topic. A name that breaks them is refused by
the service only when the event is published, after the blobs, the insight and the event metas were
committed (hostile trial: 502 with 2 blobs, 2 metas, 1 insight and no event); so it is refused at
start-up (exit 2) and in ``/done``'s plan, before anything is committed (HTTP 400).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from sidecar.errors import SettingsError
from sidecar.paths import shown

# The topic setting that routes each event to the topic named after its event type.
PER_EVENT_TYPE = "{eventType}"
MAX_TOPIC_CHARS = 260
_ALLOWED = re.compile(r"[A-Za-z0-9._/-]")
_RULE = (f"a Service Bus topic name has 1 to {MAX_TOPIC_CHARS} characters: letters (A-Z, a-z), digits, '.', '-', "
         "'_' and '/', starting and ending with a letter or digit")


def per_event_type(topic_setting: str) -> bool:
    """Whether ``topic_setting`` routes each event to the topic named after its event type."""
    return topic_setting in ("", PER_EVENT_TYPE)


def topic_for(topic_setting: str, event_type: str) -> str:
    """The topic an event of ``event_type`` goes to under ``--servicebuseventprovider.topic=topic_setting``."""
    return event_type if per_event_type(topic_setting) else topic_setting


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Service Bus topic name (one phrase), or None when it can."""
    if not name:
        return "is empty"
    if len(name) > MAX_TOPIC_CHARS:
        return f"has {len(name)} characters, more than {MAX_TOPIC_CHARS}"
    bad = sorted({c for c in name if not _ALLOWED.fullmatch(c)})
    if bad:
        return "holds " + ", ".join(shown(repr(c)) for c in bad[:10])
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "does not start and end with a letter or digit"
    if "//" in name:
        return "has an empty path segment ('//')"
    return None


def type_problems(event_types: Iterable[str]) -> Iterator[tuple[int, str]]:
    """``(index, problem)`` for each of ``event_types`` (in order) that cannot name its own topic: not a
    topic name, or the name of an earlier one in another case (Service Bus names are case-insensitive)."""
    first: dict[str, str] = {}
    for index, event_type in enumerate(event_types):
        problem = name_problem(event_type)
        if problem:
            yield index, f"event type '{shown(event_type)}' {problem}: {_RULE}"
            continue
        seen = first.setdefault(event_type.lower(), event_type)
        if seen != event_type:
            yield index, (f"event types '{shown(seen)}' and '{shown(event_type)}' differ only in case: Service Bus "
                          "names are case-insensitive, so both would go to one topic")


def check_settings(topic_setting: str, event_types: list[str]) -> None:
    """Refuse at start-up a topic setting, or (per event type) a valid event type, that cannot name a
    topic, and event types that name one topic in different cases.

    Args:
        topic_setting: ``--servicebuseventprovider.topic``.
        event_types: ``--valideventtypes``.

    Raises:
        SettingsError: one line naming the flag and the value.
    """
    if not per_event_type(topic_setting):
        problem = name_problem(topic_setting)
        if problem:
            raise SettingsError(f"--servicebuseventprovider.topic={shown(topic_setting)} {problem}: {_RULE}")
        return
    how = ("each event goes to the topic named after its event type (--servicebuseventprovider.topic is "
           f"{'empty' if not topic_setting else PER_EVENT_TYPE}); rename the event type or set "
           "--servicebuseventprovider.topic to one topic")
    for _, problem in type_problems(event_types):
        raise SettingsError(f"--valideventtypes: {problem}; {how}")


def event_problems(topic_setting: str, events: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(file, problem)`` for each planned event whose event type cannot name its own topic
    (:func:`type_problems`); ``events`` is ``(file, event type)`` in plan order. Empty when all events go
    to one topic."""
    if not per_event_type(topic_setting):
        return []
    return [(events[index][0], f"key 'eventType': {problem}; each event goes to the topic named after its event type")
            for index, problem in type_problems(event_type for _, event_type in events)]
