"""Many processes: an experiment trained as DistributedDataParallel on torch.distributed, its ranks
stepped together (DESIGN.md §10)."""
