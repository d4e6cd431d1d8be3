"""Task-vector rewrites and the static merges built on them.

- :mod:`~adamerge.rewrite.operations`: TIES trimming and sign election, DARE, Breadcrumbs, TALL
  masks / Consensus, LiNeS depth scaling, each on stacked task vectors;
- :mod:`~adamerge.rewrite.static_merge`: :class:`StaticMerge`, one generalised task arithmetic
  whose rewrite every static merge (and AdaMerging++) uses;
- :mod:`~adamerge.rewrite.presets`: the published static merges as plain field values (no torch,
  so that the command line lists them cheaply).
"""
