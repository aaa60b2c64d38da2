#!/usr/bin/env python
"""Hyperparameter search for neural language models: `python tune.py experiments/quickstart.yaml`.

See docs/tuning.md, or `python tune.py --help`.
"""
import sys

from lmtune.cli import main

if __name__ == "__main__":
    sys.exit(main())
