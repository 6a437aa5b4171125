"""The recovery-point verbs: mkpoint, lspoint, rmpoint, restorepoint, each
through click's CliRunner on a unit on disk (each command opens and closes
it, so every step also crosses a reopen)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fastfc import StorageUnit
from fastfc.tools.cli import main


@pytest.fixture
def fastfc(tmp_path):
    runner = CliRunner()

    def run(*args, code=0):
        r = runner.invoke(main, ["--unit", str(tmp_path / "u"), *map(str, args)],
                          catch_exceptions=False)
        assert r.exit_code == code, (r.stdout, r.stderr)
        if code == 1:
            assert r.stderr.startswith("Error: ")
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r

    return run


def test_take_list_expire_and_restore_points(fastfc, tmp_path):
    fastfc("mkvol", "a", "b", "--tracks", 4)
    fastfc("write", "a", "before", "--offset", 0)
    out = fastfc("mkpoint", "a", "b", "--name", "good", "--retain", 3600).stdout
    assert "took recovery point a#0, retained 3600 s" in out and "b#0" in out
    fastfc("write", "a", "garbage", "--offset", 0)
    fastfc("mkpoint", "a")
    listed = json.loads(fastfc("lspoint", "--json").stdout)
    assert [(p["point"], p["name"]) for p in listed] == [("a#0", "good"), ("a#1", None),
                                                       ("b#0", "good")]
    assert json.loads(fastfc("lspoint", "b", "--json").stdout)[0]["point"] == "b#0"
    assert "a#1" in fastfc("lspoint").stdout
    # retention holds across commands (each a reopen); nothing expires if one cannot
    err = fastfc("rmpoint", "a#1", "a#0", code=1).stderr
    assert "retained" in err
    assert len(json.loads(fastfc("lspoint", "a", "--json").stdout)) == 2
    fastfc("rmpoint", "a#1")
    assert [p["point"] for p in json.loads(fastfc("lspoint", "--json").stdout)] == \
        ["a#0", "b#0"]
    fastfc("restorepoint", "a#0", "--to", "rec")
    with StorageUnit(tmp_path / "u") as u:
        assert bytes(u.volume("rec").read(0, 6)) == b"before"
        assert bytes(u.volume("a").read(0, 7)) == b"garbage"
    fastfc("restorepoint", "a#0", "--onto-source")
    with StorageUnit(tmp_path / "u") as u:
        assert bytes(u.volume("a").read(0, 7)) == b"before\0"
        assert np.array_equal(u.points.point("a", 0).image(), u.volume("rec").read(
            0, u.volume("rec").capacity))


def test_bad_requests(fastfc):
    fastfc("mkvol", "a", "--tracks", 2)
    fastfc("mkpoint", "zz", code=1)
    fastfc("lspoint", "zz", code=1)
    fastfc("rmpoint", "a#4", code=1)
    fastfc("rmpoint", "a", code=2)
    fastfc("restorepoint", "a#0", code=2)
    fastfc("mkpoint", "a")
    fastfc("restorepoint", "a#0", "--to", "a", code=1)
    fastfc("restorepoint", "a#0", "--to", "r", "--onto-source", code=2)
    assert "no recovery points" in fastfc("lspoint", "--json").stdout or \
        json.loads(fastfc("lspoint", "--json").stdout)[0]["point"] == "a#0"
