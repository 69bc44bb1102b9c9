"""A sink must never fail or slow a release: ``Events`` swallows what it raises."""

from __future__ import annotations

from orchestrator.events import Event, Events, Kind, RecordingSink


class Broken:
    def emit(self, event: Event) -> None:
        raise OSError("disk full")

    def close(self) -> None:
        raise RuntimeError("already closed")


def test_a_failing_sink_does_not_stop_the_others() -> None:
    kept = RecordingSink()
    events = Events([Broken(), kept])
    events.emit(Event(Kind.PROMOTED, "r1", state="window"))
    events.close()
    assert kept.kinds() == [Kind.PROMOTED]


def test_an_event_serialises_with_its_kind_and_release() -> None:
    data = Event(Kind.ROLLED_BACK, "r1", state="rolled_back", reason="p99", at=1.0).as_dict()
    assert data == {"event": "rolled_back", "release": "r1", "state": "rolled_back",
                    "stage": None, "stages": None, "weight": None, "reason": "p99",
                    "at": 1.0, "details": {}}
