"""The ``fastfc`` command line (``python -m fastfc``), in the DS8000 DSCLI style.

Every invocation opens the storage unit(s) it is given, runs one command and
closes them again: all state lives in the unit directories and no daemon runs
in between. Without a server, copies therefore make progress only while a
command runs: ``--wait`` (mkflash, resyncflash, mkpprc, resumepprc) and
``waitflash`` copy in the foreground with a progress bar, and ``formcg``
forms Global Mirror consistency groups; a command that leaves a copy
unfinished says what moves it on. ``serve`` is the one command that stays: it holds its
units and exports their volumes over NBD until SIGTERM or SIGINT. While a
server holds a unit, the other commands naming it are sent to that server
and carried out there, with the same output and exit status (:mod:`.control`;
the ``fastfc`` console script does so before it imports any of this:
:mod:`fastfc_client`),
and ``resumegmir`` runs a session's loop in the server until ``pausegmir``
(:mod:`.loops`; recorded in the unit, so a server that opens it again
resumes the session). In a server, background copies (FlashCopy, PPRC
initial copy, resync and Global Copy) move on by themselves (:mod:`.copies`).

``--unit`` names the local unit: the volumes of FlashCopy relationships, the
primaries of PPRC pairs, the A volumes of Global Mirror sessions.
``--remote-unit`` names the unit holding PPRC secondaries and the B and C
volumes of sessions (default: the local unit). Units that the open ones name
as partners of their pairs and sessions are opened too, so that a pair is
always whole and every host write to a primary is recorded.

Expected errors (a refused operation, a missing volume, a damaged unit, a
number too large, memory or disk space running out) print one line to stderr
and exit with status 1, having created nothing; usage errors exit with status
2. Set ``FASTFC_DEBUG=1`` to get the traceback instead. Progress goes to
stderr: a bar on a terminal, plain lines in a pipe. ``ls*`` and ``show*``
commands print JSON with ``--json``.

The modules, by what they drive: :mod:`.app` (the group, its options,
errors and exit statuses, ``demo`` and ``bench``), :mod:`.units` (the units
one invocation opens), :mod:`.params` (what the command line accepts),
:mod:`.output` (tables, JSON, progress), :mod:`.control` (commands carried
out by the process that holds a unit), :mod:`.loops` (the Global Mirror
loops a server runs), :mod:`.copies` (the background copies it moves on), and the commands: :mod:`.volumes`,
:mod:`.flash`, :mod:`.pprc`, :mod:`.gmir`, :mod:`.points`, :mod:`.unitview` (showunit), :mod:`.serve` (the NBD server of
:mod:`fastfc.tools.nbd`, with the seam for services beside it). A command
module registers its commands on :func:`main` when imported; the help lists
them in this order.
"""

from .app import main
from . import volumes, flash, pprc, gmir, points, unitview, serve  # noqa: E402,F401  (registers the commands)

__all__ = ["main"]
