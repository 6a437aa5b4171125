"""``python -m fastfc_client``: the ``fastfc`` command, as its console
script runs it (named ``fastfc``, as ``python -m fastfc`` names it)."""

from fastfc_client import main

if __name__ == "__main__":
    main(prog_name="fastfc")
