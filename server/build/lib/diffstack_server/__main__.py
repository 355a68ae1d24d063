"""``python -m diffstack_server [flags]``: the same command, with the same flags, as ``diffstack serve``."""

import sys

from diffstack_server.cli import main_serve

sys.exit(main_serve())
