"""Closing a storage unit while FlashCopy background copies run."""

from __future__ import annotations

import threading

from fastfc import FlashCopy, StorageUnit
from fastfc.durable.sqlite import SQLiteStore


def test_close_waits_for_a_background_copy_ending_its_relationship(tmp_path, monkeypatch):
    """A worker that finished the copy of a non-persistent relationship
    ended it after close() had closed the unit's database: the row delete
    raised in the thread, and the relationship came back on reopening.

    Replayed deterministically: the worker is held at the start of ending
    its relationship until close() either joins it (it must) or closes the
    store without having joined it (the bug)."""
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    end, join, store_close = FlashCopy._end_if_complete, threading.Thread.join, SQLiteStore.close
    worker = []
    ending, go = threading.Event(), threading.Event()
    alive_at_store_close = []

    def held_end(self):
        if threading.current_thread() is not threading.main_thread():
            worker.append(threading.current_thread())
            ending.set()
            assert go.wait(10)
        end(self)

    def joining(self, *args, **kw):
        if worker and self is worker[0]:
            go.set()                    # close() waits for the worker: let it end
        return join(self, *args, **kw)

    def closing(self):
        alive_at_store_close.append(bool(worker) and worker[0].is_alive())
        go.set()                        # the bug: the worker ends on a closed store
        return store_close(self)

    monkeypatch.setattr(FlashCopy, "_end_if_complete", held_end)
    monkeypatch.setattr(threading.Thread, "join", joining)
    monkeypatch.setattr(SQLiteStore, "close", closing)
    with StorageUnit(tmp_path / "u") as u:
        s, t = u.create_volume("S", 8, 512), u.create_volume("T", 8, 512)
        s.write(0, b"image" * 100)
        FlashCopy(s, t)     # COPY mode, not persistent: ends once copied
        assert ending.wait(10)          # the copy is done; the worker is ending it
    worker[0].join(10)
    assert alive_at_store_close == [False]
    assert errors == []
    monkeypatch.undo()
    with StorageUnit(tmp_path / "u") as u:
        assert u.flashcopies == []
        assert u.volume("T").read(0, 500).tobytes() == b"image" * 100
