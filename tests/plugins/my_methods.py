"""A user's own methods, written outside the package against its public API only."""

from adamerge.methods import LearnedMethod, StaticMethod, register_method

# a learned method, found by ``--method tests.plugins.my_methods:GENTLE_ADAMERGING``
GENTLE_ADAMERGING = LearnedMethod("gentle-adamerging", "a user's variant", init=0.5, lr=1e-2, constraint="none")

# a static method registered under its own name, found by ``--method dense-ties`` once imported
register_method(StaticMethod("dense-ties", "TIES keeping half of each task vector",
                             {"sparsify": "magnitude", "density": 0.5, "sign": "sum", "scale": 0.5}), replace=True)
