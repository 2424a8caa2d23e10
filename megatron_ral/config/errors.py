"""The one error type a bad configuration raises."""

from megatron_ral.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration value: ``key`` is the dotted name, ``rule`` what it broke."""

    def __init__(self, key: str, rule: str):
        self.key = key
        self.rule = rule
        super().__init__(f"config error: {key}: {rule}")
