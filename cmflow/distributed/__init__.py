"""Work spread over a Ray cluster from inside a stage: Ray Train jobs (:mod:`cmflow.distributed.train`)."""
