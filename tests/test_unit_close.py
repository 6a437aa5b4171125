"""Closing a storage unit while FlashCopy background copies run."""

from __future__ import annotations

import threading
import time

from fastfc import FlashCopy, StorageUnit


def test_close_waits_for_a_background_copy_ending_its_relationship(tmp_path, monkeypatch):
    """A worker that finished the copy of a non-persistent relationship
    ended it after close() had closed the unit's database: the row delete
    raised in the thread, and the relationship came back on reopening."""
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    end = FlashCopy._end_if_complete

    def late_end(self):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.2)     # close() runs meanwhile
        end(self)

    monkeypatch.setattr(FlashCopy, "_end_if_complete", late_end)
    with StorageUnit(tmp_path / "u") as u:
        s, t = u.create_volume("S", 8, 512), u.create_volume("T", 8, 512)
        s.write(0, b"image" * 100)
        FlashCopy(s, t)     # COPY mode, not persistent: ends once copied
    assert errors == []
    monkeypatch.setattr(FlashCopy, "_end_if_complete", end)
    with StorageUnit(tmp_path / "u") as u:
        assert u.flashcopies == []
        assert u.volume("T").read(0, 500).tobytes() == b"image" * 100
