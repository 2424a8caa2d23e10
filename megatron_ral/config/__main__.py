"""``python -m megatron_ral.config``: see :mod:`megatron_ral.cli.config`."""

from megatron_ral.cli.config import cli

if __name__ == "__main__":
    cli()
