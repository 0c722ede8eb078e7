"""The `gradhub` command: run a local cluster, or one component, or read a run's status."""
