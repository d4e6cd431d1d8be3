"""Task types (:class:`TaskType`): what a task's output is and how it is scored."""

from adamerge.task_types.classification import Classification
from adamerge.task_types.task_type import TaskType
from adamerge.task_types.token_level import IGNORE_INDEX, TokenLevel

#: The task type of every source today: per-task classifier heads.
CLASSIFICATION = Classification()

__all__ = ["CLASSIFICATION", "IGNORE_INDEX", "Classification", "TaskType", "TokenLevel"]
