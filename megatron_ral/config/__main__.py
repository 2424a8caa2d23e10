"""``python -m megatron_ral.config``: see :mod:`megatron_ral.config.cli`."""

from megatron_ral.config.cli import cli

if __name__ == "__main__":
    cli()
