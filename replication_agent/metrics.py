"""The agent's Prometheus metrics (``sharedsync_*``, base units, ``_total`` counters).

One ``volume`` label per volume is the product's unit of work and bounded by the volumes a
node holds; ``peer`` is bounded by the replica count.
"""

from prometheus_client import Counter, Gauge, Histogram

BYTES = Counter(
    "sharedsync_replication_bytes_total",
    "Replication stream bytes, by direction (sent on the wire, received and applied)",
    ["volume", "direction"])
LAG = Gauge(
    "sharedsync_replication_lag_seconds",
    "Age of the oldest change not yet held by the peer (upper bound)", ["volume", "peer"])
SYNC_SECONDS = Histogram(
    "sharedsync_sync_duration_seconds",
    "Time from taking a snapshot to the acknowledgement that completes a sync cycle",
    ["volume", "mode"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
SYNC_ERRORS = Counter(
    "sharedsync_sync_errors_total", "Failed pushes to a peer, by reason", ["volume", "reason"])
REPLICA_STATE = Gauge(
    "sharedsync_replica_state",
    "1 for the state each replica is in (InSync, Lagging, Rebuilding, Stale, Failed)",
    ["volume", "node", "state"])
REBUILD_PROGRESS = Gauge(
    "sharedsync_rebuild_progress_ratio", "Progress of a replica rebuild (0..1)",
    ["volume", "peer"])
SNAPSHOT_BYTES = Gauge(
    "sharedsync_snapshot_bytes", "Space held only by replication snapshots", ["volume"])
CONFLICTS = Counter(
    "sharedsync_conflicts_total", "Concurrent writes to one file resolved by policy",
    ["volume"])
EPOCH = Gauge("sharedsync_volume_epoch", "The volume's epoch as this node knows it", ["volume"])
WRITES_SUSPENDED = Gauge(
    "sharedsync_volume_writes_suspended",
    "1 while this primary takes no writes: its agent Lease lapsed and no peer answers",
    ["volume"])
LAG_EXCEEDED = Counter(
    "sharedsync_lag_exceeded_total", "Times a peer's lag went over the policy's maxLag",
    ["volume", "peer"])
SCRUB_ERRORS = Counter(
    "sharedsync_scrub_errors_total",
    "Checksum, read and verify errors found by scrubbing a replica", ["volume"])
THROTTLED = Counter(
    "sharedsync_writer_throttled_total",
    "fsync/close calls held back because a replica lagged beyond maxLag (onLagExceeded: "
    "Throttle)", ["volume"])
SHARED_STREAMS = Counter(
    "sharedsync_shared_streams_total",
    "Increments sent to a peer from the stream recorded for another one, without a btrfs send "
    "of their own", ["volume"])
JOURNAL_RECORDS = Counter(
    "sharedsync_journal_records_total",
    "Synchronous fsync groups committed by a journal record (data only) instead of a snapshot",
    ["volume"])
RPC_DENIED = Counter(
    "sharedsync_agent_rpc_denied_total",
    "Calls on the agent's network port refused for the caller's certificate", ["method_name"])
