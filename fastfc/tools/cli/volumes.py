"""Volumes and host I/O: mkvol, lsvol, rmvol, write, read."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import click
import numpy as np

from fastfc.copyservices.flashcopy import CHUNK_BYTES
from fastfc.copyservices.pprc import PPRCPair
from fastfc.durable.lock import LOCK_FILE
from fastfc.durable.sqlite import JOURNAL_FILE, RESERVE_FILE

from .app import main, warn_problems
from .output import console, human, json_out, plural, table
from .params import JSON, MAX_BYTES, POSITIVE_SIZE, SIZE, TRACK_SIZE, VOLUME, Count
from .units import Units, pass_units


@main.command()
@click.argument("names", nargs=-1, required=True, type=VOLUME)
@click.option("--tracks", type=Count(low=1), help="Number of tracks.")
@click.option("--size", type=POSITIVE_SIZE,
              help="Capacity instead of --tracks, e.g. 64M, 1.5G, 2T, 1P (binary units; "
                   "rounded up to tracks).")
@click.option("--track-size", type=TRACK_SIZE, default="64K", show_default=True,
              help="Bytes per track: a power of two, 512 to 16M.")
@click.option("--thin", is_flag=True,
              help="Allocate blocks on first write instead of now (a full filesystem "
                   "then refuses that write, with nothing half-written).")
@pass_units
def mkvol(units, names, tracks, size, track_size, thin) -> None:
    """Create zero-filled volumes (the unit too, if new) [mkfbvol].

    Everything is checked first: a volume that cannot be made (a size past
    what the filesystem has free, a name taken) creates nothing at all.
    Volumes are thick (every block allocated now) unless --thin."""
    if (tracks is None) == (size is None):
        raise click.UsageError("give exactly one of --tracks and --size")
    if len(set(names)) != len(names):
        raise click.ClickException("a volume name is given twice")
    n = tracks if tracks is not None else max(1, -(-size // track_size))
    capacity = n * track_size
    if capacity > MAX_BYTES:
        raise click.ClickException(f"{n} tracks of {human(track_size)} is {capacity} bytes: "
                                   f"more than a volume can hold ({MAX_BYTES} bytes)")
    where = units.where(units.local_path) if units.local_path else None
    if where is None:
        raise click.UsageError("no storage unit given: use --unit PATH (or set FASTFC_UNIT)")
    existing = where
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if not thin and capacity * len(names) > free:
        what = f"{len(names)} volumes of {human(capacity)}" if len(names) > 1 \
            else f"a volume of {human(capacity)}"
        shown = units.local_path if existing == where else existing   # as the user named it
        raise click.ClickException(f"{what} does not fit: the filesystem of {shown} has "
                                   f"{human(free)} free")
    new_unit = not (where / "unit.db").exists()
    ours = _absent_unit_entries(where) if new_unit else None
    try:
        unit = units.local(create=True)
        for name in names:
            if name in unit:
                raise click.ClickException(f"volume {name!r} already exists in this unit")
        made = []
        try:
            for name in names:   # a create that fails leaves no file and no row
                made.append(unit.create_volume(name, n, track_size, thin=thin))
        except BaseException:
            for vol in made:
                unit.remove_volume(vol.name)
            raise
    except BaseException:
        if ours is not None:   # once the units are closed, take away what this made
            click.get_current_context().find_root().call_on_close(
                lambda: _remove_new_unit(*ours))
        raise
    for vol in made:
        click.echo(f"created volume {vol.name}: {plural(vol.n_tracks, 'track')} of "
                   f"{human(vol.track_size)} ({human(vol.capacity)})")


#: what opening a new unit creates in its directory (nothing else is ever removed)
_UNIT_ENTRIES = ("unit.db", "unit.db-wal", "unit.db-shm", "unit.db-journal", JOURNAL_FILE,
                 LOCK_FILE, RESERVE_FILE, "volumes", "bitmaps")


def _absent_unit_entries(where: Path) -> tuple[list[Path], list[Path]]:
    """Before a new unit is made at ``where``: the unit's entries that are
    not there yet, and the directories (``where`` and the parents it lacks,
    deepest first) that do not exist yet. Only these may be taken away if
    the command fails."""
    dirs = []
    p = where
    while not os.path.lexists(p) and p != p.parent:
        dirs.append(p)
        p = p.parent
    entries = [where / n for n in _UNIT_ENTRIES if not os.path.lexists(where / n)]
    return entries, dirs


def _remove_new_unit(entries: list[Path], dirs: list[Path]) -> None:
    """Undo the unit a failed mkvol created (it holds no volume): remove by
    name the unit's entries this command made, then the directories it made
    if they are empty. Nothing that was there before is touched."""
    vols = next((p for p in entries if p.name == "volumes"), None)
    if vols is not None and vols.is_dir() and any(vols.iterdir()):
        return      # a volume exists after all: keep the unit
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for d in dirs:          # deepest first; one holding anything stays
        try:
            d.rmdir()
        except OSError:
            return


@main.command()
@JSON
@pass_units
def lsvol(units, as_json) -> None:
    """List the unit's volumes [lsfbvol]."""
    unit = units.local()
    warn_problems(units, "volume", "FlashCopy", "pair")
    vols = sorted(unit.volumes(), key=lambda v: v.name)
    if as_json:
        json_out([{"name": v.name, "tracks": v.n_tracks, "track_size": v.track_size,
                   "capacity": v.capacity, "valid": bool(v.valid),
                   "roles": _roles(v, units)} for v in vols])
        return
    t = table("Name", "Tracks", "Track size", "Capacity", "Roles")
    for v in vols:
        t.add_row(v.name, str(v.n_tracks), human(v.track_size), human(v.capacity),
                  ", ".join(_roles(v, units)) or "-")
    console().print(t if t.rows else "no volumes")


def _roles(v, units: Units) -> list[str]:
    roles = [f"FC source of {r.target.name}" for r in v.source_relationships]
    if v.target_relationship is not None:
        roles.append(f"FC target of {v.target_relationship.source.name}")
    if isinstance(v.mirror, PPRCPair):
        roles.append(f"PPRC primary of {v.mirror.secondary.name}")
    elif (pending := _pending_pair(v)) is not None:
        roles.append(f"PPRC primary of {pending['secondary_name']} (unit away)")
    if v.is_secondary:
        roles.append("PPRC secondary")
    roles += [f"GM {gm.name}" for u in units.open.values() for gm in u.sessions.values()
              if any(v in (t.a, t.b, t.c) for t in gm.triplets)]
    if v.write_inhibited:
        roles.append("write-inhibited")
    rs = v.restoring
    if rs is not None:
        roles.append(f"restoring {rs.point.volume.name}#{rs.point.seq} "
                     f"({plural(rs.tracks_to_copy, 'track')} to copy; read-only until then)")
    if not v.valid:
        roles.append("INVALID")
    return roles


@main.command()
@click.argument("names", nargs=-1, required=True, type=VOLUME)
@click.option("--force", is_flag=True, help="Delete volumes that hold data too.")
@pass_units
def rmvol(units, names, force) -> None:
    """Delete volumes that are in no relationship, pair or session [rmfbvol].

    A volume that holds data (any byte not zero) is refused unless --force."""
    unit = units.local()
    missing = [name for name in names if name in unit.volume_problems]
    vols = [unit.volume(name) for name in names if name not in missing]
    for v in vols:
        if v.relationships or v.mirror is not None or v.is_secondary or _pending_pair(v):
            raise click.ClickException(
                f"volume {v.name} is in a FlashCopy relationship, PPRC pair or Global Mirror "
                f"session ({', '.join(_roles(v, units))}); rmflash, rmpprc or rmgmir first")
        if not force:
            at = _first_data(v)
            if at is not None:
                raise click.ClickException(
                    f"volume {v.name} holds data (its first non-zero byte is at offset {at} "
                    f"of {v.capacity}): rmvol --force deletes it")
    for name in names:
        unit.remove_volume(name)
        click.echo(f"removed volume {name}" + (" (its file was missing)" if name in missing
                                               else ""))


def _first_data(vol) -> int | None:
    """Offset of the first non-zero byte of ``vol``'s image, None if all zero
    (or if it holds no valid image: nothing to lose then)."""
    if not vol.valid:
        return None
    for at in range(0, vol.capacity, CHUNK_BYTES):
        chunk = vol.read(at, min(CHUNK_BYTES, vol.capacity - at))
        nz = np.flatnonzero(chunk)
        if nz.size:
            return at + int(nz[0])
    return None


def _pending_pair(vol) -> dict | None:
    """The stored row of a pair whose primary is ``vol`` and whose secondary
    unit could not be opened (so the pair is not restored)."""
    rows = [r for r in vol.unit.pair_records if r["primary_name"] == vol.name]
    return rows[0] if rows else None


@main.command()
@click.argument("volume", type=VOLUME)
@click.argument("data")
@click.option("--offset", type=SIZE, default=0, show_default=True, help="Byte offset.")
@click.option("--repeat", type=Count(low=1), default=1, show_default=True,
              help="Write DATA this many times back to back.")
@pass_units
def write(units, volume, data, offset, repeat) -> None:
    """Host write: DATA (UTF-8 text) to VOLUME at --offset."""
    unit = units.local()
    vol = unit.volume(volume)
    pending = _pending_pair(vol)
    if pending and vol.mirror is None:   # the library would not record it
        raise click.ClickException(
            f"{volume} is a PPRC primary whose secondary unit {pending['secondary_unit']} "
            "is not available; its writes could not be recorded")
    piece = data.encode()
    total = len(piece) * repeat
    _check_range(vol, offset, total)
    _write_repeated(vol, offset, piece, repeat)
    note = "; recorded out of sync (the secondary unit is not available)" if pending else ""
    click.echo(f"wrote {total} bytes to {volume} at offset {offset}{note}")


def _check_range(vol, offset: int, length: int) -> None:
    """One clear line for I/O that does not fit, naming the capacity."""
    if offset > vol.capacity:
        raise click.ClickException(f"offset {offset} is past the end of {vol.name}, which "
                                   f"holds {vol.capacity} bytes ({human(vol.capacity)})")
    if length > vol.capacity - offset:
        raise click.ClickException(
            f"{length} bytes at offset {offset} do not fit in {vol.name}: it holds "
            f"{vol.capacity} bytes ({human(vol.capacity)}), {vol.capacity - offset} "
            "from that offset")


def _write_repeated(vol, offset: int, piece: bytes, repeat: int) -> None:
    """``piece`` ``repeat`` times from ``offset``, in writes of at most about
    CHUNK_BYTES: memory stays small whatever --repeat is."""
    if not piece:
        vol.write(offset, b"")
        return
    per = max(1, min(repeat, CHUNK_BYTES // len(piece)))
    block = piece * per
    left = repeat
    while left:
        k = min(per, left)
        vol.write(offset, block if k == per else piece * k)
        offset += k * len(piece)
        left -= k


@main.command()
@click.argument("volume", type=VOLUME)
@click.option("--offset", type=SIZE, default=0, show_default=True, help="Byte offset.")
@click.option("--length", type=SIZE, help="Bytes to read [default: 256, or to the end "
                                          "with --sha256].")
@click.option("--sha256", is_flag=True, help="Print the SHA-256 of the bytes instead.")
@pass_units
def read(units, volume, offset, length, sha256) -> None:
    """Host read: a hex dump of VOLUME's logical image (as hexdump -C)."""
    vol = units.local().volume(volume)
    _check_range(vol, offset, 0)
    if length is None:
        length = vol.capacity - offset if sha256 else min(256, vol.capacity - offset)
    _check_range(vol, offset, length)
    chunks = (vol.read(at, min(CHUNK_BYTES, offset + length - at))
              for at in range(offset, offset + length, CHUNK_BYTES))
    if sha256:
        h = hashlib.sha256()
        for chunk in chunks:
            h.update(chunk)
        click.echo(f"{h.hexdigest()}  {volume}[{offset}:{offset + length}]")
        return
    for line in _hexdump(chunks, offset):
        click.echo(line)


def _hexdump(chunks, base: int):
    """Lines as ``hexdump -C`` prints them, repeated lines squeezed to '*'.
    ``chunks``: the bytes in pieces (each a multiple of 16 but the last)."""
    previous, squeezed, at = None, False, base
    for chunk in chunks:
        data = bytes(chunk)
        for i in range(0, len(data), 16):
            row = data[i:i + 16]
            if row == previous:
                if not squeezed:
                    yield "*"
                squeezed = True
                continue
            previous, squeezed = row, False
            hexes = " ".join(f"{b:02x}" for b in row).ljust(47)
            text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
            yield f"{at + i:08x}  {hexes[:23]}  {hexes[24:]}  |{text}|"
        at += len(data)
    yield f"{at:08x}"
