"""Utilities that need neither detectron2 nor the model: reading weights files as data
(:mod:`~panoptic_segformer.utils.safe_load` over :mod:`~panoptic_segformer.utils.weights_pickle`
and :mod:`~panoptic_segformer.utils.pickle_stand_ins`) and Boundary PQ
(:mod:`~panoptic_segformer.utils.boundary_pq`)."""
