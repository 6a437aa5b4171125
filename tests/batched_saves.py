"""Test shim: a consistency group's FlashCopy steps recorded as one batch
per group and step (``Store.save_flashes``), as the batched CG path records
them.

Until ``FlashCopyGroup`` calls ``save_flashes`` itself, every relationship's
step saves its own row (``FlashCopy._save`` -> ``save_flash``). The shim
routes the saves made inside ``FlashCopyGroup.prepare_all`` / ``_finish``
into one ``save_flashes`` call per group and step, so that the kill,
power-cut and model tests run a unit's batch record (the FlashCopy log of
``SQLiteStore``) under the session. It does nothing once
``fastfc.copyservices.groups`` calls ``save_flashes`` (then production
batches, and the tests run that).
"""

from __future__ import annotations

import inspect
import threading

from fastfc.copyservices import groups
from fastfc.copyservices.flashcopy import FlashCopy

_batch = threading.local()


def needed() -> bool:
    """Whether the CG path still saves relationship by relationship."""
    return "save_flashes" not in inspect.getsource(groups)


def _saving(orig_save):
    def _save(self):
        batch = getattr(_batch, "value", None)
        if batch is not None and self._store is batch[0]:
            if self not in batch[1]:
                batch[1].append(self)
            return
        orig_save(self)
    return _save


def _batched(step):
    def run(self, *args, **kwargs):
        if not self.store.durable or getattr(_batch, "value", None) is not None:
            return step(self, *args, **kwargs)
        _batch.value = (self.store, [])
        try:
            return step(self, *args, **kwargs)
        finally:
            store, fcs = _batch.value
            _batch.value = None
            if fcs:
                ids = store.save_flashes([fc.to_record() for fc in fcs])
                for fc, rid in zip(fcs, ids):
                    fc._store_id = rid
    return run


def install(monkeypatch=None) -> bool:
    """Install the shim (through ``monkeypatch`` when given, so that it is
    undone after the test); returns whether it was needed."""
    if not needed():
        return False
    patches = [(FlashCopy, "_save", _saving(FlashCopy._save)),
               (groups.FlashCopyGroup, "prepare_all",
                _batched(groups.FlashCopyGroup.prepare_all)),
               (groups.FlashCopyGroup, "_finish", _batched(groups.FlashCopyGroup._finish))]
    for owner, name, value in patches:
        if monkeypatch is not None:
            monkeypatch.setattr(owner, name, value)
        else:
            setattr(owner, name, value)
    return True
