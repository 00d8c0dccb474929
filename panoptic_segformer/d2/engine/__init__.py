"""Training with detectron2: the trainer and ``main`` of ``train_net.py``
(:mod:`~panoptic_segformer.d2.engine.train`), launching processes on one or several machines
(:mod:`~panoptic_segformer.d2.engine.launch`) and stopping cleanly on a cluster's signal
(:mod:`~panoptic_segformer.d2.engine.preemption`)."""
