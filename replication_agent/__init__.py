"""The sharedsync agent: the per-node replication sidecar that keeps replicas in sync."""
