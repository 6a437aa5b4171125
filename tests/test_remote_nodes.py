"""Real Ray nodes on this machine (``ray.cluster_utils.Cluster``), each with
a resource of its own: site B holds the secondary units, site A the primary
(a Ray actor with its A volumes in a storage unit, forming CGs with host
writes), the head neither. The node holding the primary is stopped
mid-formation; an operator's driver at site B recovers and fails over the
units: every B and C holds one whole CG, the one the primary saved at its
coordination instant. Then the head's node is lost, and what Ray does then
is checked.

The cluster runs in a child process of its own (a test process may hold
another Ray cluster already: tests/test_remote_ray.py's). Slow: two Ray
nodes start."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

if not os.environ.get("CI") and importlib.util.find_spec("ray") is None:
    pytest.skip("could not import 'ray': No module named 'ray'", allow_module_level=True)

#: Ray ends a process that cannot reach the cluster's GCS (on the head) for
#: this long (default 60 s): short here, so the test need not wait a minute
GCS_TIMEOUT = 8

#: the operator at site B: a Ray driver of its own
DRIVER = r"""
import json, os, sys, time
import numpy as np
import ray
from ray.exceptions import RayActorError
import fastfc
from fastfc import remote

base, address, site_a_id = sys.argv[1:4]
N, TS = 256, 4096
ray.init(address=address, namespace="fastfc", log_to_driver=False)
units = [remote.SecondaryUnit.start(f"{base}/u{i}", name=f"u{i}",
                                    resources={"site_b": 0.01}) for i in range(2)]
for i in range(4):
    units[i % 2].create_volume(f"b{i}", N, TS)
    units[i % 2].create_volume(f"c{i}", N, TS)


@ray.remote(num_cpus=0, resources={"site_a": 0.01}, max_restarts=0)
class Primary:
    # the primary site: A volumes in a storage unit, the session, the writers

    def __init__(self, base):
        from fastfc.tools.testing import RandomWriters
        self.base = base
        self.p = fastfc.StorageUnit(f"{base}/primary")
        us = [remote.SecondaryUnit.attach(f"u{i}") for i in range(2)]
        self.trips = [(self.p.create_volume(f"a{i}", N, TS), us[i % 2].volume(f"b{i}"),
                       us[i % 2].volume(f"c{i}")) for i in range(4)]
        self.gm = fastfc.GlobalMirror(self.trips, on_coordinate=self.snapshot)
        self.writers = RandomWriters([t[0] for t in self.trips], threads=1, seed=3, pace=1e6)

    def snapshot(self, seq):
        tmp = f"{self.base}/snap-{seq}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.stack([t[0].array for t in self.trips]))
        os.replace(tmp, f"{self.base}/snap-{seq}.npy")

    def node(self):
        return ray.get_runtime_context().get_node_id()

    def run(self):
        self.writers.start()
        for _ in range(3):
            assert self.gm.form_consistency_group().committed
        self.gm.start()            # the continuous loop, writers on
        return self.gm.stats.sequence


prim = Primary.remote(base)
assert ray.get(prim.node.remote(), timeout=60) == site_a_id
assert ray.get(prim.run.remote(), timeout=120) >= 3
pids = [u.info()["pid"] for u in units]
print(json.dumps({"ready": pids}), flush=True)
assert sys.stdin.readline().strip() == "site A is lost"
try:
    ray.get(prim.node.remote(), timeout=30)
    raise AssertionError("the primary answered after its node was stopped")
except RayActorError:
    pass
# from site B alone: the units answer, in the same processes
assert [u.info()["pid"] for u in units] == pids
seq = remote.recover(units, "gm")
images = np.load(f"{base}/snap-{seq}.npy")
for i in range(4):
    u = units[i % 2]
    for name in (f"b{i}", f"c{i}"):
        v = u.volume(name)
        assert np.array_equal(v.read(0, v.capacity), images[i]), (name, seq)
print(json.dumps({"recovered": seq}), flush=True)
time.sleep(600)        # the operator's process stays: until Ray ends it
"""

#: the cluster: the head, site B (the units' node) and site A (the primary's)
SCRIPT = r"""
import json, os, subprocess, sys, time
os.environ["RAY_gcs_rpc_server_reconnect_timeout_s"] = sys.argv[3]
import numpy as np
from ray.cluster_utils import Cluster
from fastfc import remote

base, driver = sys.argv[1:3]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False})
site_b = cluster.add_node(num_cpus=1, resources={"site_b": 1})
site_a = cluster.add_node(num_cpus=0, resources={"site_a": 1})
cluster.wait_for_nodes()
op = subprocess.Popen([sys.executable, driver, base, cluster.address, site_a.node_id],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def state(pid):        # the process's state letter (ps's STAT); None once it is gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def gone(pid):
    return state(pid) in (None, "Z")      # (an exited child not reaped yet: gone)


def threads(pid):      # each thread's name and where in the kernel it waits
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f, \
                    open(f"/proc/{pid}/task/{tid}/wchan") as g:
                out.append(f"{f.read().strip()}:{g.read().strip()}")
        except OSError:
            pass
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.path.exists(spy):
        r = subprocess.run([spy, "dump", "--native", "--pid", str(pid)],
                           capture_output=True, text=True, timeout=60)
        out.append(r.stdout[-6000:] + r.stderr[-500:])
    return "\n".join(out)


try:
    pids = json.loads(op.stdout.readline())["ready"]
    time.sleep(0.3)
    cluster.remove_node(site_a)               # site A is lost, its processes with it
    op.stdin.write("site A is lost\n")
    op.stdin.flush()
    seq = json.loads(op.stdout.readline())["recovered"]
    print(f"site A lost: recovered CG {seq} on site B", flush=True)
    # the head's node lost: every Ray process that can no longer reach the
    # GCS ends (the detached units, the operator's driver)
    t = time.monotonic()
    cluster.remove_node(cluster.head_node, allow_graceful=False)
    while not (all(gone(p) for p in pids) and op.poll() is not None):
        if time.monotonic() - t > 60:
            left = [(what, p) for what, p in [*(("unit", p) for p in pids), ("driver", op.pid)]
                    if not gone(p)]
            raise AssertionError("still running after 60 s: " + ", ".join(
                f"{what} {p} state {state(p)}" for what, p in left) + "\n" + "\n".join(
                f"{what} {p}:\n{threads(p)}" for what, p in left))
        time.sleep(0.2)
    print(f"head lost: units and driver ended after {time.monotonic() - t:.1f} s", flush=True)
    # the units' directories hold what they held: reopened (here without
    # Ray), B and C are on the recovered CG
    images = np.load(f"{base}/snap-{seq}.npy")
    units = [remote.LocalUnit.start(f"{base}/u{i}", name=f"u{i}") for i in range(2)]
    for i in range(4):
        for name in (f"b{i}", f"c{i}"):
            v = units[i % 2].volume(name)
            assert np.array_equal(v.read(0, v.capacity), images[i]), name
    print("reopened from disk: B and C on the recovered CG", flush=True)
finally:
    if op.poll() is None:
        op.kill()
    try:
        cluster.shutdown()
    except Exception:
        pass
"""


def test_two_nodes_site_a_lost_recovered_from_site_b_then_the_head_lost(tmp_path):
    """Site A's node stopped mid-formation: recovered and failed over from
    site B, every B and C on the CG the primary saved at its coordination
    instant. Then the head's node lost: every process that can no longer
    reach the GCS ends after ``GCS_TIMEOUT``, the detached units (by their
    own watch of the GCS) and the operator's driver (by Ray's) alike; the
    units' directories reopened hold that CG still (what
    docs/guide/remote.md says of where the head lives)."""
    if os.environ.get("CI"):
        import ray  # noqa: F401  (CI installs the remote extra: fail loudly without it)
    else:
        pytest.importorskip("ray")
    script, driver = tmp_path / "cluster.py", tmp_path / "driver.py"
    script.write_text(SCRIPT)
    driver.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(driver),
                           str(GCS_TIMEOUT)], capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-15000:]
    assert "site A lost: recovered CG" in out, out
    assert "head lost: units and driver ended" in out, out
    assert "reopened from disk" in out, out
