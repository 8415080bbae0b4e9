"""``python -m megatron_growloop.analysis ...`` (see :mod:`megatron_growloop.analysis.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
