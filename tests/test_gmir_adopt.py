"""mkgmir over existing Global Copy pairs (the DS8000 way): the operator
makes A->B Global Copy pairs (mkpprc --type gcp), lets them copy, then
mkgmir SESSION A:B:C adopts those pairs instead of refusing them or making
new ones. The pair's out-of-sync bitmap carries on: a track already sent is
not sent again (counted with ``Volume.copied_bytes`` on B, and with the
session's ``bytes_drained``). The first CG still keeps the promise: every C
holds A's image at its coordination instant.

Refused, with nothing changed: a Metro Mirror pair, a pair from A to
another volume, a suspended pair, a pair in another session. The adopted
session survives the unit's reopen (a fresh command sees it), works through
fastfc serve, and rmgmir leaves the adopted pairs as Global Copy pairs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fastfc import GlobalMirror, PPRCPair, StateError, StorageUnit
from fastfc.tools.cli import main
from helpers import image, rand
from test_serve import fastfc_cli, serving, volume_bytes

TS = 4096
N = 32          # tracks per volume: 128 KiB


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    return tmpfs_tmp_path


def make(unit: StorageUnit, n: int = 2) -> None:
    for i in range(n):
        for tag in "ABC":
            unit.create_volume(f"{tag}{i}", N, TS)
        unit.volume(f"A{i}").write(0, rand(N * TS, 10 + i))


def triplets(u: StorageUnit, n: int = 2):
    return [(u.volume(f"A{i}"), u.volume(f"B{i}"), u.volume(f"C{i}")) for i in range(n)]


def synced_pairs(u: StorageUnit, n: int = 2) -> list[PPRCPair]:
    pairs = [PPRCPair(u.volume(f"A{i}"), u.volume(f"B{i}"), mode="gcp", background=False)
             for i in range(n)]
    for p in pairs:
        p.drain()
        assert p.out_of_sync_tracks == 0
    return pairs


def state_of(u: StorageUnit) -> dict:
    """What a refused mkgmir must leave as it was."""
    return {"sessions": sorted(u.store.session_rows()), "flash": len(u.flashcopies),
            "pairs": sorted((p.primary.name, p.secondary.name, p.mode.value,
                             p.state.value, p.out_of_sync_tracks) for p in u.pairs),
            "c_valid": [v.valid for v in u.volumes() if v.name.startswith("C")],
            "rels": {v.name: len(v.relationships) for v in u.volumes()}}


# -- the library -----------------------------------------------------------------------
def test_adopted_synced_pairs_send_only_what_changed_and_keep_the_promise(tmp_path):
    with StorageUnit(tmp_path / "u") as u:
        make(u)
        pairs = synced_pairs(u)
        links = [p.link for p in pairs]
        B = [u.volume("B0"), u.volume("B1")]
        before = [b.copied_bytes for b in B]
        snaps: dict[int, list[np.ndarray]] = {}
        A = [u.volume("A0"), u.volume("A1")]
        gm = GlobalMirror(triplets(u), name="s", adopt=True, max_coordination_time=0.5,
                          on_coordinate=lambda seq: snaps.__setitem__(
                              seq, [a.read(0, a.capacity) for a in A]))
        assert [t.pair for t in gm.triplets] == pairs       # the same pairs, taken over
        assert all(t.adopted for t in gm.triplets)
        assert all(p.link is not old for p, old in zip(pairs, links))   # the session's
        A[0].write(3 * TS, rand(TS, 1))     # one track changed after the pairs synced
        A[1].write(7 * TS + 100, rand(50, 2))
        res = gm.form_consistency_group()
        assert res, res
        for t, want in zip(gm.triplets, snaps[1]):
            assert np.array_equal(image(t.c), want)
        # only the changed track of each went to B: nothing was copied again
        assert [b.copied_bytes - x for b, x in zip(B, before)] == [TS, TS]
        assert gm.stats.bytes_drained == 2 * TS
        gm.close()
        # the adopted pairs stay, Global Copy pairs again; the FlashCopies go
        assert sorted((p.primary.name, p.mode.value) for p in u.pairs) == \
            [("A0", "gcp"), ("A1", "gcp")]
        assert all(p.active for p in pairs) and u.flashcopies == []


def test_a_pair_still_copying_carries_on_from_where_it_was(tmp_path):
    with StorageUnit(tmp_path / "u") as u:
        make(u, 1)
        pair = PPRCPair(u.volume("A0"), u.volume("B0"), mode="gcp", background=False)
        pair.drain(10 * TS)                 # the first pass is partly done
        left = pair.out_of_sync_tracks
        assert 0 < left < N
        b = u.volume("B0")
        before = b.copied_bytes
        gm = GlobalMirror(triplets(u, 1), name="s", adopt=True, max_coordination_time=0.5)
        assert gm.form_consistency_group()
        assert b.copied_bytes - before == left * TS          # the rest, once
        assert np.array_equal(image(u.volume("C0")), image(u.volume("A0")))


def test_mixed_session_adopts_one_pair_and_makes_the_other(tmp_path):
    with StorageUnit(tmp_path / "u") as u:
        make(u)
        (pair,) = synced_pairs(u, 1)
        gm = GlobalMirror(triplets(u), name="s", adopt=True, max_coordination_time=0.5)
        assert [t.adopted for t in gm.triplets] == [True, False]
        assert gm.triplets[1].pair.out_of_sync_tracks == N      # a new pair: all tracks
        assert gm.form_consistency_group()
        gm.close()
        assert [(p.primary.name, p.secondary.name) for p in u.pairs] == [("A0", "B0")]
        assert u.volume("B1").is_secondary is False


def test_without_adopt_a_paired_a_is_still_refused(tmp_path):
    with StorageUnit(tmp_path / "u") as u:
        make(u, 1)
        synced_pairs(u, 1)
        before = state_of(u)
        with pytest.raises(Exception, match="already in a PPRC pair"):
            GlobalMirror(triplets(u, 1), name="s")
        assert state_of(u) == before


@pytest.mark.parametrize("case", ["mmir", "wrong partner", "suspended", "other session"])
def test_refusals_change_nothing(tmp_path, case):
    with StorageUnit(tmp_path / "u") as u:
        make(u, 3)
        a, b = u.volume("A0"), u.volume("B0")
        if case == "mmir":
            pair = PPRCPair(a, b, mode="mmir", background=False)
            want = "Metro Mirror"
        elif case == "wrong partner":
            pair = PPRCPair(a, u.volume("B2"), mode="gcp", background=False)
            want = "primary of pair A0:B2, not of A0:B0"
        elif case == "suspended":
            pair = PPRCPair(a, b, mode="gcp", background=False)
            pair.suspend("host")
            want = "suspended .*resumepprc"
        else:
            pair = PPRCPair(a, b, mode="gcp", background=False)
            GlobalMirror([(a, b, u.volume("C2"))], name="first", adopt=True)
            want = "already belongs to Global Mirror session first"
        pair.drain()
        link = pair.link
        before = state_of(u)
        # the second triplet would be fine: the refusal of the first undoes it
        trips = [(u.volume("A1"), u.volume("B1"), u.volume("C1")), triplets(u, 1)[0]]
        with pytest.raises((StateError, ValueError), match=want):
            GlobalMirror(trips, name="s", adopt=True)
        assert state_of(u) == before
        assert pair.link is link and a.mirror is pair
    with StorageUnit(tmp_path / "u") as u:        # and on disk too
        assert "s" not in u.store.session_rows()
        assert u.volume("A1").mirror is None and u.volume("C1").relationships == []


def test_adopted_session_survives_reopen_and_rmgmir_then_keeps_its_pairs(tmp_path):
    with StorageUnit(tmp_path / "u") as u:
        make(u)
        synced_pairs(u, 1)
        GlobalMirror(triplets(u), name="s", adopt=True, max_coordination_time=0.5)
    with StorageUnit(tmp_path / "u") as u:
        gm = u.session("s")
        assert [t.adopted for t in gm.triplets] == [True, False]
        assert gm.form_consistency_group()
        assert np.array_equal(image(u.volume("C0")), image(u.volume("A0")))
        gm.close()
        assert [(p.primary.name, p.secondary.name, p.mode.value) for p in u.pairs] == \
            [("A0", "B0", "gcp")]
    with StorageUnit(tmp_path / "u") as u:
        assert [(p.primary.name, p.secondary.name) for p in u.pairs] == [("A0", "B0")]
        assert u.store.session_rows() == {}


# -- the command line ------------------------------------------------------------------
def cli(site1, site2, *args, code=0):
    r = CliRunner().invoke(main, ["-u", str(site1), "-r", str(site2), *map(str, args)],
                           catch_exceptions=False)
    assert r.exit_code == code, (args, r.stdout, r.stderr)
    return r


def cli_volumes(site1, site2):
    for site, names in ((site2, ["B0", "B1", "C0", "C1"]), (site1, ["A0", "A1"])):
        r = CliRunner().invoke(main, ["-u", str(site), "mkvol", *names, "--tracks", str(N),
                                      "--track-size", str(TS)], catch_exceptions=False)
        assert r.exit_code == 0, r.stderr
    for i in range(2):
        cli(site1, site2, "write", f"A{i}", f"data of A{i}", "--offset", 5 * TS + i,
            "--repeat", 300)


def test_cli_mkgmir_adopts_synced_pairs_and_a_fresh_command_sees_them(tmp_path):
    site1, site2 = tmp_path / "s1", tmp_path / "s2"
    cli_volumes(site1, site2)
    cli(site1, site2, "mkpprc", "A0:B0", "A1:B1", "--type", "gcp", "--wait")
    out = cli(site1, site2, "mkgmir", "S", "A0:B0:C0", "A1:B1:C1").stdout
    assert "adopted Global Copy pair A0:B0: 0 tracks out of sync (no initial copy)" in out
    assert "adopted Global Copy pair A1:B1" in out
    cli(site1, site2, "formcg", "S")
    show = json.loads(cli(site1, site2, "showgmir", "S", "--json").stdout)
    assert show["successes"] == 1 and show["bytes_drained"] == 0    # nothing sent again
    for i in range(2):
        assert np.array_equal(volume_bytes(site2, f"C{i}"), volume_bytes(site1, f"A{i}"))
    # refused: the pairs are the session's now
    r = cli(site1, site2, "mkgmir", "T", "A0:B0:C1", code=1)
    assert "already belongs to Global Mirror session S" in r.stderr
    r = cli(site1, site2, "rmgmir", "S")
    assert "adopted pairs stay Global Copy pairs: A0:B0, A1:B1" in r.stdout
    pairs = json.loads(cli(site1, site2, "lspprc", "--json").stdout)
    assert sorted((p["id"], p["mode"]) for p in pairs) == [("A0:B0", "gcp"), ("A1:B1", "gcp")]


@pytest.mark.parametrize("make_pair, want", [
    (["mkpprc", "A0:B0", "--type", "mmir", "--wait"], "pair A0:B0 is Metro Mirror"),
    (["mkpprc", "A0:B1", "--type", "gcp", "--wait"], "primary of pair A0:B1, not of A0:B0"),
    (["mkpprc", "A0:B0", "--type", "gcp", "--wait"], "is suspended (host): resume it first"),
])
def test_cli_refusals_leave_the_units_as_they_were(tmp_path, make_pair, want):
    site1, site2 = tmp_path / "s1", tmp_path / "s2"
    cli_volumes(site1, site2)
    cli(site1, site2, *make_pair)
    if "suspended" in want:
        cli(site1, site2, "pausepprc", "A0:B0")
    before = [cli(site1, site2, c, "--json").stdout for c in ("lspprc", "lsgmir", "lsflash")]
    specs = ["A0:B0:C0"] if "B1" in make_pair[1] else ["A1:B1:C1", "A0:B0:C0"]
    r = cli(site1, site2, "mkgmir", "S", *specs, code=1)
    assert want in r.stderr, r.stderr
    after = [cli(site1, site2, c, "--json").stdout for c in ("lspprc", "lsgmir", "lsflash")]
    assert after == before


@pytest.mark.slow
def test_mkgmir_adopts_through_fastfc_serve(tmp_path):
    site1, site2, sock = tmp_path / "s1", tmp_path / "s2", tmp_path / "sock"
    cli_volumes(site1, site2)
    with serving(site1, sock, remote=site2):
        u = ["-u", site1, "-r", site2]
        fastfc_cli(*u, "mkpprc", "A0:B0", "A1:B1", "--type", "gcp", "--wait")
        out = fastfc_cli(*u, "mkgmir", "S", "A0:B0:C0", "A1:B1:C1").stdout
        assert "adopted Global Copy pair A0:B0: 0 tracks out of sync" in out
        fastfc_cli(*u, "formcg", "S")
        show = json.loads(fastfc_cli(*u, "showgmir", "S", "--json").stdout)
        assert show["successes"] == 1 and show["bytes_drained"] == 0
        assert [t["pair_state"] for t in show["triplets"]] == ["copy pending"] * 2
    for i in range(2):
        assert np.array_equal(volume_bytes(site2, f"C{i}"), volume_bytes(site1, f"A{i}"))
    # a fresh command, no server: the session is there
    assert json.loads(fastfc_cli("-u", site1, "-r", site2, "lsgmir", "--json").stdout)[0][
        "session"] == "S"
