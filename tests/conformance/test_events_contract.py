"""Event publisher conformance, the error contract and hostile values, for every event provider.

Errors (``testsupport.contract``): a bus that refuses connections is a retryable 503; a refused SAS
key is a permanent 502 (the bus really answered 401 on ``$cbs``); a topic that does not exist is a
permanent 502 naming it; no message, traceback or log line carries the key or connection string.
Values: every pair value and correlation id of the hostile corpus reaches the consumer as it was sent.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from sidecar.errors import DataPlaneError, is_transient
from sidecar.models import Event, EventContext, KeyValuePair
from testsupport.contract import assert_no_secret, assert_refused, assert_unavailable, failure_of
from testsupport.hostile import ODD_VALUES
from testsupport.providers import EventSubject
from testsupport.servicebus import make_events, unique

STORE = "event bus"


def attempt(subject: EventSubject, flags: list[str], events: list[Event]) -> BaseException:
    """Publish ``events`` with a provider opened on ``flags``; returns what it raised."""
    return asyncio.run(failure_of(subject, flags, lambda plane: plane.events.publish(events)))


def test_unreachable_bus_is_retryable_and_shows_no_secret(remote_event_subject: EventSubject,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    event_type = unique("down")
    exc = attempt(remote_event_subject, remote_event_subject.unreachable, make_events(2, [event_type]))
    assert_unavailable(exc, STORE)
    assert_no_secret(remote_event_subject, exc, caplog.text)


def test_refused_key_is_permanent_and_shows_no_secret(remote_event_subject: EventSubject,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    event_type = unique("refused")
    remote_event_subject.prepare([event_type])
    exc = attempt(remote_event_subject, remote_event_subject.refused, make_events(2, [event_type]))
    assert_refused(exc, STORE)
    assert remote_event_subject.provider.refusal_seen(remote_event_subject, exc), "the bus did not refuse"
    assert_no_secret(remote_event_subject, exc, caplog.text)
    assert remote_event_subject.published([event_type])[event_type] == [], "nothing was delivered"


def test_missing_topic_is_permanent_naming_it(remote_event_subject: EventSubject,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    event_type = unique("nowhere")  # no topic declared for it (nor the fixed topic)
    exc = attempt(remote_event_subject, remote_event_subject.flags, make_events(1, [event_type]))
    assert isinstance(exc, DataPlaneError) and exc.status_code == 502 and not is_transient(exc), repr(exc)
    topic = event_type if remote_event_subject.topic == "{eventType}" else remote_event_subject.topic
    assert f"'{topic}'" in str(exc)
    assert_no_secret(remote_event_subject, exc, caplog.text)


def test_hostile_values_reach_the_consumer_as_sent(event_subject: EventSubject,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    event_type = unique("odd")
    event_subject.prepare([event_type])
    events = [Event(context=EventContext(eventId=unique("evt"), correlationId=f"corr-{name}-{value[:40]}",
                                         parentEventId="evt-parent ü"),
                    type=event_type, data=[KeyValuePair(key=f"k-{name}", value=value)])
              for name, value in ODD_VALUES.items()]
    dataplane = event_subject.dataplane()

    async def run() -> None:
        try:
            await dataplane.events.publish(events)
        finally:
            await dataplane.close()

    asyncio.run(run())
    got = {r.message_id: r for r in event_subject.published([event_type])[event_type]}
    assert {i: r.event for i, r in got.items()} == {e.id: e for e in events}
    assert all(got[e.id].correlation_id == e.context.correlationId for e in events)
    for secret in event_subject.secrets:
        assert secret not in caplog.text
