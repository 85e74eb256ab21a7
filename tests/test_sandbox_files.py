"""The files module against a tree that changes under it: both resolvers (openat2, and the per-component
fallback the server uses where the kernel lacks openat2) raced by a thread swapping a directory for a link."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from sandbox_server import files
from sandbox_server.errors import BadRequest, NotFound


@pytest.fixture
def raced(tmp_path):
    """A session directory whose `d` keeps turning from a real directory into a link to `outside` and back."""
    session, outside = tmp_path / "session", tmp_path / "outside"
    session.mkdir()
    outside.mkdir()
    (outside / "f").write_text("outside")
    (outside / "victim").write_text("keep")
    (session / "real").mkdir()
    (session / "real" / "f").write_text("inside")
    os.symlink(outside, session / "link")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            for name in ("real", "link"):
                try:
                    os.rename(session / name, session / "d")
                    time.sleep(0)  # let the other thread find `d` in this state (the GIL serialises us)
                    os.rename(session / "d", session / name)
                except OSError:
                    pass

    thread = threading.Thread(target=swap, daemon=True)
    thread.start()
    yield session, outside
    stop.set()
    thread.join(5)


@pytest.mark.parametrize("resolver", [files.open_beneath, files.open_by_components], ids=["openat2", "fallback"])
def test_no_resolver_follows_a_link_however_the_tree_changes(raced, resolver):
    session, _ = raced
    seen = set()
    with files.session_directory(str(session)) as root:
        for _ in range(3000):
            try:
                descriptor = resolver(root, ["d", "f"], os.O_RDONLY | os.O_NONBLOCK)
            except OSError as error:
                seen.add(error.strerror)
                continue
            with os.fdopen(descriptor) as handle:
                seen.add(handle.read())
    assert "outside" not in seen
    assert "inside" in seen, seen  # the race really ran both ways


def test_writes_and_deletes_under_the_race_stay_inside(raced, monkeypatch):
    monkeypatch.setattr(files, "_openat2_works", False)  # the fallback: one O_NOFOLLOW open per component
    session, outside = raced
    for attempt in range(300):
        for action in (lambda number=attempt: files.write(str(session), f"d/new-{number}", b"x", None, 1 << 20),
                       lambda: files.delete(str(session), "d/victim"),
                       lambda: files.open_for_reading(str(session), "d/f", None, 1 << 20)[0].close()):
            try:
                action()
            except (BadRequest, NotFound):
                pass
    assert sorted(os.listdir(outside)) == ["f", "victim"]


def test_paths_that_could_leave_are_refused_before_any_open(tmp_path):
    for path in ("/etc/passwd", "../x", "a/../../x", "a//b", "./a", "", "a/\x00"):
        with pytest.raises(BadRequest):
            files.split(path)


def test_listing_is_bounded_and_deep_trees_are_no_recursion_error(tmp_path):
    tree = tmp_path / "tree"
    deep = tree
    os.mkdir(tree)
    for _ in range(1500):  # deeper than the interpreter's recursion limit
        deep = deep / "d"
        os.mkdir(deep)
    for number in range(30):
        (tree / f"file-{number}").write_text("x")
    try:
        found, truncated = files.listing(str(tree), limit=10)
        assert len(found) == 10 and truncated
        found, truncated = files.listing(str(tree))
        assert len(found) == 30 and not truncated
    finally:
        # pytest's own clean-up of old temporary directories recurses: a tree this deep would crash it.
        assert asyncio.run(files.remove_tree(str(tree)))
