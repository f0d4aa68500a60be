"""Recording from other frameworks' training loops, each in its own module so that its framework stays an
optional dependency: import the one you use.

    unlearn_fast.integrations.hf           transformers.Trainer (needs transformers and accelerate)
    unlearn_fast.integrations.lightning    lightning.Trainer (needs the `lightning` extra)
    unlearn_fast.integrations.distributed  torch.distributed DDP (rank 0 records the world batch; retrain replays
                                           under DDP with the same number of ranks)
"""
