"""The cmflow error inside Ray's wrappers, so a stage fails with the task's own one-line message.

Ray re-raises a task's exception as ``RayTaskError`` (and Ray Data as ``RayTaskError(UserCodeException)``,
Ray Train as ``TrainingFailedError``); the original object is sometimes in the chain (``.cause``,
``__cause__``) and sometimes only in the text, which then ends with the original
``cmflow.errors.<Name>: <message>`` line.
"""

from __future__ import annotations

import re

from cmflow import errors

_LINE = re.compile(r"cmflow\.errors\.(\w+): (.+)")


def unwrap(exc: BaseException) -> BaseException:
    """The :class:`~cmflow.errors.CmflowError` that ``exc`` wraps, rebuilt from its text if need be; else ``exc``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, errors.CmflowError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
    found = _LINE.findall(str(exc))
    if found:
        name, message = found[-1]
        kind = getattr(errors, name, None)
        if isinstance(kind, type) and issubclass(kind, errors.CmflowError):
            return kind(message.strip())
    return exc
