"""`python -m normsweep`: the command line (normsweep/cli.py)."""

from normsweep.cli import console

if __name__ == "__main__":
    console()
