"""``python -m diffstack_server [flags]``: the same as ``diffstack serve``."""

import sys

from diffstack_server.app import main_serve

sys.exit(main_serve())
