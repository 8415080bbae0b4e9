"""``python -m megatron_growloop.eval ...`` (see :mod:`megatron_growloop.eval.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
