"""Option vocabularies that the command line needs before anything heavy is imported.

Each list is declared here once; the modules that implement the options import it from here
(``adamerge.core.batchnorm``, ``adamerge.run.workflow``), and ``adamerge --help`` shows it without importing
torch.
"""

from __future__ import annotations

#: BatchNorm running-statistics policies (see :mod:`adamerge.core.batchnorm`); ``auto`` is resolved to
#: ``per-task`` or ``reestimate`` once the experts are loaded.
BATCHNORM_POLICIES = ("auto", "reestimate", "per-task", "base", "merge")
#: The policies that recompute statistics on calibration data.
REESTIMATING_POLICIES = ("reestimate", "per-task")
#: Storage dtypes of the task vectors (names of ``torch`` dtypes).
TASK_VECTOR_DTYPES = ("float32", "bfloat16", "float16")
#: Coefficient constraints ``g`` (see :mod:`adamerge.core.coefficients`).
CONSTRAINTS = ("none", "clamp", "sigmoid")
#: The forms ``--granularity`` accepts (see :func:`adamerge.core.granularity.parse_granularity`).
GRANULARITY_FORMS = ("task", "layer", "tensor", "block", "group:REGEX[;REGEX...]", "chunk:N", "partition:N")
#: Lightning precisions ``--precision`` accepts: full float32, or autocast in bfloat16 (CPU and
#: GPU) or float16 (CUDA only); the task vectors keep ``--task-vector-dtype`` either way.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
#: The next-token distributions an unlabeled objective scores on a causal LM's calibration
#: records: every real token, or only the one after the prompt, where the response starts.
TOKEN_POSITIONS = ("all", "response")
#: The inference masks of Concrete AdaMerging (:mod:`adamerge.core.concrete_mask`).
EVAL_MASKS = ("expected", "hard", "sample")
#: ``--positions``: one of :data:`TOKEN_POSITIONS`, or ``auto``: ``response`` when every
#: calibration record is a prompt to answer, else ``all``.
POSITION_CHOICES = ("auto", *TOKEN_POSITIONS)
#: The label of a token that is not scored (Hugging Face's convention): the token-level task type
#: drops it, and the few-shot data marks prompts and padding with it.
IGNORE_INDEX = -100
#: ``--align-modules`` name of the features entering a task's head (see :mod:`adamerge.core.hooks`).
HEAD_INPUT = "<head input>"
#: ``adamerge pareto --metric``: each task's score at a λ (see :mod:`adamerge.run.pareto`).
PARETO_METRICS = ("auto", "accuracy", "agreement")
