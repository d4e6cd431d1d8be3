"""A user's own methods, written outside the package against its public API only."""

from adamerge.methods import LearnedMethod, StaticMethod, register_method
from adamerge.objectives.task_objectives import Objective

# a learned method, found by ``--method tests.plugins.my_methods:GENTLE_ADAMERGING``
GENTLE_ADAMERGING = LearnedMethod("gentle-adamerging", "a user's variant", init=0.5, lr=1e-2, constraint="none")

# a static method registered under its own name, found by ``--method dense-ties`` once imported
register_method(StaticMethod("dense-ties", "TIES keeping half of each task vector",
                             {"sparsify": "magnitude", "density": 0.5, "sign": "sum", "scale": 0.5}), replace=True)


class MaxConfidence(Objective):
    """A user's objective: raise each task's top softmax probability (counts its calls)."""

    calls = 0

    def forward(self, task, outputs, batch):
        MaxConfidence.calls += 1
        return -outputs.logits.float().softmax(-1).amax(-1).mean()


# a learned method whose objective lives outside adamerge too
CONFIDENT_MERGING = LearnedMethod("confident-merging", "a user's objective", objective="tests.plugins.my_methods:MaxConfidence")
