"""`python -m lmtune ...`: the same command line as `python tune.py ...` and `lmtune ...`."""
import sys

from lmtune.cli import main

sys.exit(main())
