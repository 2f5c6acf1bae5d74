"""``python -m trio_echo`` is the ``trio-echo`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
