"""Generic I/O at the bottom of the package: atomic text files (:mod:`~adamerge.storage.files`),
state-dict files (:mod:`~adamerge.storage.checkpoints`) and the output folder of a run
(:mod:`~adamerge.storage.output_folder`). Nothing here knows about merging."""
