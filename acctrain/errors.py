"""The errors acctrain raises for bad input: each names the field and the fix."""


class ConfigError(ValueError):
    """A configuration value is invalid; raised before anything is written to `output_dir`.

    `field` is the config field (dotted for nested values, e.g. `schedule_args.div`), so callers and
    tests can tell which value was wrong; the message says how to fix it.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")
