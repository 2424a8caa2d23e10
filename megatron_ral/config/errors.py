"""The one error type a bad configuration raises."""

from megatron_ral.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration value: ``key`` is the dotted name, ``rule`` what it broke."""

    same_on_every_rank = True  # every rank reads the same file and overrides

    def __init__(self, key: str, rule: str):
        self.key = key
        self.rule = rule
        super().__init__(f"config error: {key}: {rule}")
