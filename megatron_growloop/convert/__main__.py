"""``python -m megatron_growloop.convert``; kept import-light (megatron's checkpoint writer
spawns a helper process that re-imports the main module)."""

import sys

from megatron_growloop.convert.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
