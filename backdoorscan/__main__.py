"""``python -m backdoorscan``: the same command line as ``backdoorscan``."""

from backdoorscan.cli import main

if __name__ == "__main__":
    main()
