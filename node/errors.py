"""Error hierarchy of the node.

Errors are raised where the problem is found and translated at the boundary:
to a DICOM status in the SCP, an HTTP problem response in the API, a retry or
dead letter in a task, an exit code on the command line.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(NodeError):
    """A configuration file or value is invalid; the message names key and reason."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid configuration in {self.source}:\n{lines}"


class RejectedInstance(NodeError):
    """A received instance is refused; ``status`` is the C-STORE status to answer."""

    def __init__(self, status: int, reason: str, sop_instance_uid: str = "") -> None:
        self.status = status
        self.reason = reason
        self.sop_instance_uid = sop_instance_uid
        super().__init__(f"0x{status:04X}: {reason}")


class OutOfResources(RejectedInstance):
    """Not enough disk (or another resource) to accept the instance now."""


class StorageError(NodeError):
    """Writing to the instance store failed."""


class RuleError(NodeError):
    """A routing rules document is refused; each problem reads ``line N: key: reason``.

    Raised before anything changes, so the rules that were running stay in force.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid routing rules in {self.source}:\n{lines}"


class RuleSetNotFound(RuleError):
    """A rules version that does not exist was asked for (an HTTP 404, not a 422)."""


class StudyPurged(NodeError):
    """A study asked to be analysed again whose images retention has purged."""

    def __init__(self, study_instance_uid: str, reason: str) -> None:
        super().__init__(f"study {study_instance_uid}: {reason}")
        self.study_instance_uid = study_instance_uid
