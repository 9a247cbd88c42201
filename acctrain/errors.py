"""The exceptions acctrain raises: bad input (naming the field and the fix), and how a run stopped."""

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; a SLURM script requeues on it


class ConfigError(ValueError):
    """A configuration value is invalid; raised before anything is written to `output_dir`.

    `field` is the config field (dotted for nested values, e.g. `schedule_args.div`), so callers and
    tests can tell which value was wrong; the message says how to fix it.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm was not finite (nan_policy='halt', or too many skipped steps)."""


class Preempted(SystemExit):
    """SIGTERM or SIGUSR1 reached a rank: all ranks saved a checkpoint and stop.

    A SystemExit with code PREEMPTED_EXIT_CODE (75): uncaught, the process exits with that code and the
    job can be requeued; the next run with resume=auto continues exactly where this one stopped.
    """

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message
