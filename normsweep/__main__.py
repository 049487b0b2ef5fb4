"""`python -m normsweep`: the command line (normsweep/cli.py)."""

from normsweep import startup

startup.hold()  # the collector waits until the imports are done (normsweep/startup.py)

from normsweep.cli import console  # noqa: E402

if __name__ == "__main__":
    console()
