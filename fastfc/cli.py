"""The ``fastfc`` command line (``python -m fastfc``)."""

from __future__ import annotations

import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastfc")
def main() -> None:
    """fastfc: FlashCopy, PPRC and Global Mirror for NumPy-backed volumes."""


@main.command()
@click.option("--seconds", default=20.0, show_default=True, help="How long the workload runs.")
@click.option("--triplets", default=16, show_default=True, help="(A, B, C) volume triplets.")
@click.option("--size-mib", default=32, show_default=True, help="Size of each volume.")
@click.option("--rate", "rate_mbs", default=100.0, show_default=True,
              help="Combined host write rate in MB/s (0: as fast as possible).")
@click.option("--fault-every", default=1.0, show_default=True,
              help="Seconds between injected faults (0: none).")
@click.option("--seed", default=0, show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Draw RPO and phase times over time to this PNG file.")
def demo(seconds, triplets, size_mib, rate_mbs, fault_every, seed, plot) -> None:
    """Run a Global Mirror session under random writes with faults injected."""
    from fastfc.demo import DemoConfig, run_demo
    cfg = DemoConfig(seconds=seconds, triplets=triplets, size_mib=size_mib,
                     rate_mbs=rate_mbs, fault_every=fault_every, seed=seed)
    result = run_demo(cfg, plot=plot)
    sys.exit(0 if result["promise_ok"] else 1)
