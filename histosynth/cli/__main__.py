"""`python -m histosynth.cli`: the `histosynth` command."""

import sys

from histosynth.cli import main

sys.exit(main())
