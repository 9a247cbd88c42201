"""The exceptions acctrain raises: bad input (naming the field and the fix), and how a run stopped."""

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; a SLURM script requeues on it
HANG_EXIT_CODE = 124  # as coreutils' `timeout`: a rank waited hang_timeout for others (acctrain.watchdog)
PEER_FAILED_EXIT_CODE = 125  # another rank raised; that rank exits 1 with the traceback (acctrain.watchdog)


class ConfigError(ValueError):
    """A configuration value is invalid; raised before anything is written to `output_dir`.

    `field` is the config field (dotted for nested values, e.g. `schedule_args.div`), so callers and
    tests can tell which value was wrong; the message says how to fix it.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # as it is, for the other ranks (acctrain.agreement.main_answers), subclasses too
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls: type, args: tuple, attributes: dict) -> BaseException:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(attributes)
    return err


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model or the run."""


class DataError(ValueError):
    """Another rank's first micro-batch failed (acctrain.preflight): raised on the ranks whose own did not, naming
    the failing ranks, before anything is written (those ranks raise their own error)."""


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


class HangError(SystemExit):
    """The process group could not form within `hang_timeout` (ranks that never joined, a store that never
    answered): a SystemExit with code HANG_EXIT_CODE (124), whose message names the ranks and what to do."""

    def __init__(self, message: str):
        super().__init__(HANG_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message
