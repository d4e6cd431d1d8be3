"""Training objectives for the coefficients.

- :mod:`~adamerge.objectives.losses`: functional losses (entropy, pseudo-label cross-entropy,
  distillation KL);
- :mod:`~adamerge.objectives.task_objectives`: the per-task :class:`Objective` modules that the
  training step calls (entropy, cross-entropy, pseudo-labels, Expert Merging's alignment, task
  weights). A new objective is one subclass of :class:`Objective` there (or in your own module).
"""
