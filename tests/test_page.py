"""The read merge's page decisions (``timeline.PageBuilder``), without I/O or an event loop:
order kept, duplicates dropped, collapse by object, retention, keyset cursors."""

from __future__ import annotations

from feedsvc.model import InboxItem
from feedsvc.timeline import (
    MAX_CURSOR_OBJECTS,
    Cursor,
    PageBuilder,
    Via,
    build_page,
    decode_cursor,
    object_hash,
)


def item(t: int, e: str, obj: str | None = None, author: str = "a") -> InboxItem:
    return InboxItem(event_id=e, author_id=author, kind="k", created_at=t, priority="medium",
                     payload="{}", object_id=obj)


def merged(*items: InboxItem, via: Via = "push") -> list[tuple[InboxItem, Via]]:
    return [(i, via) for i in items]


def ids(page_items: list[tuple[InboxItem, Via]]) -> list[str]:
    return [i.event_id for i, _ in page_items]


def test_keeps_order_and_drops_the_same_event_from_two_sources() -> None:
    stream = [(item(9, "y"), "pull"), (item(9, "x"), "push"), (item(5, "b"), "push"),
              (item(5, "b"), "pull"), (item(3, "c"), "pull")]
    page = build_page(stream, limit=10, since_ms=0)  # type: ignore[arg-type]
    assert ids(page.items) == ["y", "x", "b", "c"]
    assert [via for _, via in page.items] == ["pull", "push", "push", "pull"]
    assert page.next_cursor is None


def test_full_page_gets_a_cursor_only_when_more_exists() -> None:
    exact = build_page(merged(item(3, "c"), item(2, "b")), limit=2, since_ms=0)
    assert ids(exact.items) == ["c", "b"] and exact.next_cursor is None
    more = build_page(merged(item(3, "c"), item(2, "b"), item(1, "a")), limit=2, since_ms=0)
    assert ids(more.items) == ["c", "b"]
    assert more.next_cursor is not None
    cursor = decode_cursor(more.next_cursor)
    assert (cursor.created_at, cursor.event_id) == (2, "b")


def test_a_dropped_tail_item_does_not_make_a_cursor() -> None:
    # The only item after a full page is a duplicate or collapsed one: no further page.
    page = build_page(merged(item(3, "c", "o"), item(2, "b"), item(2, "b"), item(1, "a", "o")),
                      limit=2, since_ms=0)
    assert ids(page.items) == ["c", "b"] and page.next_cursor is None


def test_collapse_keeps_the_newest_and_carries_objects_in_the_cursor() -> None:
    stream = merged(item(9, "e9", "post-1"), item(8, "e8", "post-2"), item(7, "e7", "post-1"),
                    item(6, "e6"), item(5, "e5", "post-2"), item(4, "e4", "post-3"))
    first = build_page(stream, limit=2, since_ms=0)
    assert ids(first.items) == ["e9", "e8"]
    assert first.next_cursor is not None
    cursor = decode_cursor(first.next_cursor)
    assert set(cursor.objects) == {object_hash("post-1"), object_hash("post-2")}
    rest = [s for s in stream if s[0].created_at < cursor.created_at]
    second = build_page(rest, limit=10, since_ms=0, cursor=cursor)
    assert ids(second.items) == ["e6", "e4"]  # post-1 and post-2 were shown on page one


def test_cursor_keeps_only_the_newest_objects() -> None:
    n = MAX_CURSOR_OBJECTS + 20
    stream = merged(*(item(1000 - i, f"e{i}", f"o{i}") for i in range(n + 1)))
    page = build_page(stream, limit=n, since_ms=0)
    assert page.next_cursor is not None
    objects = decode_cursor(page.next_cursor).objects
    assert len(objects) == MAX_CURSOR_OBJECTS
    assert objects[-1] == object_hash(f"o{n - 1}")


def test_retention_drops_expired_items() -> None:
    page = build_page(merged(item(50, "new"), item(10, "old")), limit=5, since_ms=20)
    assert ids(page.items) == ["new"]


def test_builder_reports_when_it_wants_nothing_more() -> None:
    builder = PageBuilder(1, 0, Cursor(100, "z"))
    assert builder.offer(item(9, "a"), "push") is True
    assert builder.offer(item(9, "a"), "pull") is True  # a duplicate: still wanting
    assert not builder.done
    assert builder.offer(item(8, "b"), "push") is False
    assert builder.done and builder.offer(item(7, "c"), "push") is False
    assert ids(builder.page.items) == ["a"]
