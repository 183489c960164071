"""Run the simulated VM as a command: python -m migrator.simvm create|run|check."""

import sys

from .cli import main

sys.exit(main())
