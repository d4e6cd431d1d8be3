"""Calibration and evaluation data: image folders (:mod:`~adamerge.data.images`), text files
(:mod:`~adamerge.data.texts`), the image size and normalisation (:mod:`~adamerge.data.image_preprocessing`)
and a loader whose position survives a checkpoint (:mod:`~adamerge.data.resumable_loader`)."""
