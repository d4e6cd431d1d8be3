"""Task types (:class:`TaskType`): what a task's output is and how it is scored."""

from adamerge.task_types.classification import Classification
from adamerge.task_types.task_type import TaskType
from adamerge.task_types.token_level import IGNORE_INDEX, LOGITS_TO_KEEP, TokenLevel

#: Classification with per-task heads (vision models, sequence classifiers).
CLASSIFICATION = Classification()
#: Language modelling: each real token predicts the next, padding never scored (causal LMs).
LANGUAGE_MODELLING = TokenLevel(next_token=True)

__all__ = ["CLASSIFICATION", "IGNORE_INDEX", "LANGUAGE_MODELLING", "LOGITS_TO_KEEP", "Classification", "TaskType", "TokenLevel"]
