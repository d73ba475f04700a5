import sys

from powersmc.cli import main

sys.exit(main())
