"""The merging engine: task vectors → granularity → coefficients → merge → :class:`MergedModel`.

- :mod:`~adamerge.core.task_vectors`: ``τ_k = θ_k − θ_0`` as frozen buffers (dense or LoRA);
- :mod:`~adamerge.core.granularity`: how the learnable λ are laid out over the tensors;
- :mod:`~adamerge.core.coefficients`: the ``(K, G)`` parameter and its constraint;
- :mod:`~adamerge.core.merge`: the pure merge functions and their backward;
- :mod:`~adamerge.core.merged_model`: a base architecture whose weights are a function of λ;
- :mod:`~adamerge.core.batchnorm`, :mod:`~adamerge.core.row_sparse`, :mod:`~adamerge.core.hooks`,
  :mod:`~adamerge.core.model_inputs`: what the merged model needs around it.

Nothing in the core knows about sources, data, objectives, methods or the command line.
"""
