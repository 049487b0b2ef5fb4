"""`python -m normsweep`: the command line (normsweep/cli.py)."""

from normsweep.cli import main

if __name__ == "__main__":
    main()
