"""Running a method from files to an output folder: the workflow shared by ``adamerge fit`` and
``adamerge merge`` (:mod:`~adamerge.run.workflow`), their entry points (:mod:`~adamerge.run.fit`,
:mod:`~adamerge.run.merge`), the settings they read (:mod:`~adamerge.run.settings`), the
LightningModule of the training step (:mod:`~adamerge.run.module`), and what a run does around it
(checks, safeguard, resume checkpoints, progress lines, evaluation, export).

Kept free of imports so that the command line's ``--help`` reads the settings without torch.
"""
