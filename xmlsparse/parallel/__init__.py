"""Training on several processes through ``torch.distributed`` (started by ``torchrun``): the
encoder and intermediate layer replicated under DistributedDataParallel, the head sharded by label
ranges, the batch's activations all-gathered and their gradient reduce-scattered back
(``xmlsparse.parallel.sharded``), evaluation merging each rank's top-k, checkpoints written per
rank under a manifest (``xmlsparse.parallel.checkpoints``)."""
