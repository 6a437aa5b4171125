"""Control socket latency: a command forwarded to fastfc serve holding its unit vs
the same command opening an identical unit itself, whole fastfc processes
(what a shell user waits for), interleaved, medians of 8, one run.

    PYTHONPATH=. .venv/bin/python scripts/control_latency.py
"""
import statistics, subprocess, sys, tempfile, time
from pathlib import Path
base = Path(tempfile.mkdtemp())
py = [sys.executable, "-m", "fastfc"]
for d in ("held", "direct"):
    subprocess.run(py + ["-u", str(base / d), "mkvol", "a", "--tracks", "64"], check=True,
                   capture_output=True)
holder = subprocess.Popen(py + ["-u", str(base / "held"), "serve", "--socket",
                           str(base / "nbd.sock")],
                          stderr=subprocess.PIPE, text=True)
assert holder.stderr.readline().startswith("serving ")
for args in (["read", "a", "--length", "16"], ["write", "a", "0123456789abcdef"], ["lsvol"]):
    f, d = [], []
    for _ in range(8):
        for unit, acc in (("held", f), ("direct", d)):
            t = time.perf_counter()
            subprocess.run(py + ["-u", str(base / unit), *args], check=True, capture_output=True)
            acc.append(time.perf_counter() - t)
    mf, md = statistics.median(f), statistics.median(d)
    print(f"{' '.join(args[:1]):6s} forwarded {mf*1e3:6.0f} ms  direct {md*1e3:6.0f} ms  "
          f"direct/forwarded {md/mf:.2f}")
holder.terminate(); holder.wait()
import shutil
shutil.rmtree(base, ignore_errors=True)
