"""gradhub's parameter server: holds the parent model, applies pushed gradients, serves pulls."""
