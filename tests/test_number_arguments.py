"""Float arguments of the public API refuse what is not a usable number:
``nan`` passes every comparison a range check makes (``nan < 0`` is false),
so each argument is checked by name for nan, for inf where it bounds nothing,
and for a negative (or zero) value, and the call changes nothing."""

from __future__ import annotations

import math

import pytest

from fastfc import (FlashCopy, GlobalMirror, LocalLink, PPRCPair, StorageUnit, Volume,
                    faults)

NAN, INF = math.nan, math.inf


def triplet():
    return tuple(Volume(4, 4096, name=k) for k in "ABC")


@pytest.mark.parametrize("arg,bad", [
    ("cg_interval", NAN), ("cg_interval", INF), ("cg_interval", -1.0),
    ("max_drain_time", NAN), ("max_drain_time", INF), ("max_drain_time", -0.5),
    ("max_coordination_time", NAN), ("max_coordination_time", INF),
    ("max_coordination_time", 0.0), ("max_coordination_time", -1.0),
])
def test_global_mirror_refuses_a_bad_number_by_name(arg, bad):
    a, b, c = triplet()
    with pytest.raises(ValueError, match=f"^{arg} must be a"):
        GlobalMirror([(a, b, c)], **{arg: bad})
    assert a._mirror is None and c._tgt_rel is None        # nothing made


def test_global_mirror_takes_numbers_of_any_real_type():
    a, b, c = triplet()
    gm = GlobalMirror([(a, b, c)], cg_interval=1, max_drain_time=2, max_coordination_time=0.1)
    assert (gm.cg_interval, gm.max_drain_time, gm.max_coordination_time) == (1.0, 2.0, 0.1)
    gm.close(discard=True)
    with pytest.raises(TypeError, match="cg_interval must be a number"):
        GlobalMirror([triplet()], cg_interval="1")


@pytest.mark.parametrize("bad", [NAN, INF, -1.0])
def test_fault_delay_refuses_a_bad_number(bad):
    with pytest.raises(ValueError, match="^delay must be a finite number >= 0"):
        faults.inject("coordinate", delay=bad)
    assert not faults.armed_at("coordinate")


@pytest.mark.parametrize("bad", [NAN, INF, 0.0, -5.0])
def test_copy_rate_refuses_a_bad_number(bad):
    s, t = Volume(4, 4096), Volume(4, 4096)
    with pytest.raises(ValueError, match=r"^copy_rate \(bytes/s\) must be a positive finite"):
        FlashCopy(s, t, copy_rate=bad)
    assert t._tgt_rel is None and not s._src_rels


@pytest.mark.parametrize("kwargs,arg", [
    ({"bandwidth": NAN}, "bandwidth"), ({"bandwidth": INF}, "bandwidth"),
    ({"latency": NAN}, "latency"), ({"latency": INF}, "latency"),
    ({"latency": -1}, "latency"),
])
def test_link_refuses_a_bad_number(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        LocalLink(**kwargs)


@pytest.mark.parametrize("bad", [NAN, -1.0])
def test_timeouts_refuse_nan_and_negative_and_take_inf_as_no_bound(bad, tmp_path):
    s, t = Volume(4, 4096), Volume(4, 4096)
    fc = FlashCopy(s, t, background_copy=True)
    with pytest.raises(ValueError, match="^timeout must be a number >= 0"):
        fc.wait(bad)
    assert fc.wait(INF)                              # no bound: until copied
    p, q = Volume(4, 4096), Volume(4, 4096)
    pair = PPRCPair(p, q)
    with pytest.raises(ValueError, match="^timeout must be a number >= 0"):
        pair.wait_synced(bad)              # nan waited for ever
    assert pair.wait_synced(INF)
    with pytest.raises(ValueError, match="^wait must be a number >= 0"):
        StorageUnit(tmp_path / "u", wait=bad)
    assert not (tmp_path / "u").exists()
    StorageUnit(tmp_path / "u", wait=INF).close()


@pytest.mark.parametrize("kwargs,exc", [
    ({"times": NAN}, TypeError), ({"times": 1.5}, TypeError), ({"times": 0}, ValueError),
    ({"after": NAN}, TypeError), ({"after": -1}, ValueError), ({"times": True}, TypeError),
])
def test_fault_counts_are_whole_numbers(kwargs, exc):
    with pytest.raises(exc, match=f"^{next(iter(kwargs))} must be"):
        faults.inject("coordinate", **kwargs)
    assert not faults.armed_at("coordinate")
