"""gradhub's worker: trains a child copy of the model on its shard and pushes gradients."""
