"""``SQLiteStore.session_configs``: the sessions' configurations, kept in
memory between writes of them (a server's commands that only look read
them without the store lock a session's loop holds while it commits), and
always what the table holds: after a session is made, changed, removed,
and after a rolled-back change."""

from __future__ import annotations

import pytest

from fastfc import GlobalMirror, StorageUnit


def _configs_in_table(store) -> dict:
    return {n: {k: v for k, v in cfg.items() if k != "stats"}
            for n, cfg in store.session_rows().items()}


def test_session_configs_follow_every_write_and_rollback(tmp_path):
    with StorageUnit(tmp_path / "u") as u:
        a, b, c = (u.create_volume(n, 4, 4096) for n in ("A", "B", "C"))
        store = u.store
        assert store.session_configs() == {}
        gm = GlobalMirror([(a, b, c)], name="g", cg_interval=1.0)
        assert store.session_configs() == _configs_in_table(store)
        assert store.session_configs()["g"]["cg_interval"] == 1.0
        u.configure_session("g", cg_interval=2.0, running=True, rpo_alert=0.5)
        assert store.session_configs()["g"]["cg_interval"] == 2.0
        record = u.session_record("g")
        settings = u.session_settings("g")
        assert settings == {k: v for k, v in record.items()
                            if k not in ("stats", "restored", "triplets")}
        assert (settings["running"], settings["rpo_alert"]) == (True, 0.5)
        with pytest.raises(KeyError, match="no Global Mirror session named 'nosuch'"):
            u.session_settings("nosuch")
        # read inside a transaction that is then rolled back: what it read
        # there (its own uncommitted change) is not what is kept
        with pytest.raises(RuntimeError):
            with store.transaction():
                u.configure_session("g", cg_interval=3.0)
                assert store.session_configs()["g"]["cg_interval"] == 3.0
                raise RuntimeError("rolled back")
        assert store.session_configs()["g"]["cg_interval"] == 2.0
        assert store.session_configs() == _configs_in_table(store)
        # a copy each time: the caller's changes stay the caller's
        store.session_configs()["g"]["cg_interval"] = 9.0
        assert store.session_configs()["g"]["cg_interval"] == 2.0
        gm.close()
        assert store.session_configs() == {} == _configs_in_table(store)
