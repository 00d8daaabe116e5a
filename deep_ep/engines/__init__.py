"""Engines behind `deep_ep.Buffer`: the portable torch.distributed engine (CPU path and test oracle)
and, later, the CUDA engine."""
