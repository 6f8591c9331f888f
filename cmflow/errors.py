"""cmflow's error hierarchy: small in type, big in message.

Every error the CLI knows prints as one line (the problem and the next step) and exits with
``exit_code``: 2 for a bad spec, argument or input the user can fix before running, 1 for a run that
failed. Anything else is a bug and shows a traceback (always with ``--debug``).
"""

from __future__ import annotations


class CmflowError(Exception):
    """Base class: a known failure with a one-line message that names the fix.

    Messages are folded to one line (library errors quoted inside them can span several).
    """

    exit_code = 1

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(" ".join(str(message).split()), *args)


class SpecError(CmflowError):
    """The pipeline spec (YAML, ``--set`` override, JSON) is invalid."""

    exit_code = 2


class UsageError(CmflowError):
    """A CLI argument or an API argument is wrong."""

    exit_code = 2


class InputError(CmflowError):
    """User-supplied data (dataset, checkpoint, weights, URI) is missing, corrupt or unsafe."""

    exit_code = 2


class ClusterError(CmflowError):
    """The target Ray cluster cannot run the pipeline (missing resources, unreachable)."""

    exit_code = 2


class StorageError(CmflowError):
    """The artifact store failed (after retries) or holds something inconsistent."""


class TransientError(CmflowError):
    """A failure worth retrying (network, object store, lost worker). Ray retries only these."""


class StageError(CmflowError):
    """A stage failed; the run can be resumed once the cause is fixed."""


class RegistryError(CmflowError):
    """The MLflow model registry refused an operation or a model/alias does not exist."""

    exit_code = 2


class GateRejected(CmflowError):
    """A promotion gate refused a challenger."""


class Interrupted(CmflowError):
    """Ctrl-C or SIGTERM (`cmflow stop`) while a run was in progress: exit 130 like any interrupted tool."""

    exit_code = 130
