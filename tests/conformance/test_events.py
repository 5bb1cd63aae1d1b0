"""Event publisher conformance: the behaviour every event provider keeps (``conftest.EVENT_PROVIDERS``).

Each case reads back what a consumer of one event type receives: the development publisher's event
files of that type (the file name is the message id); Service Bus what an SDK subscription receiver
gets, on the type's own topic or, with a fixed topic, filtered on the ``eventType`` application property
as a subscription rule would. Exactly once relies on duplicate detection by message id.
"""

from __future__ import annotations

import asyncio

from sidecar.models import Event
from testsupport.providers import EventSubject
from testsupport.servicebus import Received, make_events, unique


def publish(subject: EventSubject, *rounds: list[Event], flags: list[str] | None = None) -> None:
    """Publish each list of events in turn with one publisher (one sidecar), then close it."""

    async def run() -> None:
        dataplane = subject.dataplane(flags)
        try:
            for events in rounds:
                await dataplane.events.publish(events)
        finally:
            await dataplane.close()

    asyncio.run(run())


def ids(records: list[Received]) -> list[str]:
    return sorted(r.message_id for r in records)


def test_one_event_is_published_with_its_message_properties(event_subject: EventSubject) -> None:
    event_type = unique("single")
    event_subject.prepare([event_type])
    [event] = make_events(1, [event_type])
    publish(event_subject, [event])
    [record] = event_subject.published([event_type])[event_type]
    assert record.event == event
    assert record.message_id == event.id
    assert record.correlation_id == event.context.correlationId
    assert record.subject == event_type and record.event_type == event_type
    assert record.content_type == "application/json"


def test_many_events_each_reach_the_consumers_of_their_type_once(event_subject: EventSubject) -> None:
    types = [unique("found"), unique("other")]
    event_subject.prepare(types)
    events = make_events(120, types, data_bytes=512)
    publish(event_subject, events)
    got = event_subject.published(types)
    for event_type in types:
        expected = [e for e in events if e.type == event_type]
        assert ids(got[event_type]) == sorted(e.id for e in expected)
        assert {r.message_id: r.event for r in got[event_type]} == {e.id: e for e in expected}


def test_republishing_the_same_events_delivers_each_exactly_once(event_subject: EventSubject) -> None:
    event_type = unique("retry")
    event_subject.prepare([event_type])
    events = make_events(6, [event_type])
    # A retried /done publishes the same events again, possibly after a partial first attempt, and
    # possibly from a restarted sidecar (another publisher).
    publish(event_subject, events[:4], events)
    publish(event_subject, events)
    assert ids(event_subject.published([event_type])[event_type]) == sorted(e.id for e in events)


def test_publishing_no_events_publishes_nothing(event_subject: EventSubject) -> None:
    event_type = unique("none")
    event_subject.prepare([event_type])
    publish(event_subject, [])
    assert event_subject.published([event_type])[event_type] == []
