"""Shared by the job entrypoints: run one `covidray` stage with this process's arguments."""

import os
import sys

# Run the code that was submitted with the job (its working dir), not an older install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(stage: str) -> None:
    from covidray.cli import main

    sys.exit(main([stage, *sys.argv[1:]]))
