"""Operator metrics (Prometheus naming: sharedsync_operator_*, base units)."""

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_SECONDS = Histogram(
    "sharedsync_operator_reconcile_duration_seconds", "Time spent in one reconcile, by handler",
    ["handler"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
RECONCILE_ERRORS = Counter(
    "sharedsync_operator_reconcile_errors_total", "Reconciles that raised, by handler",
    ["handler"])
AGENT_CALL_ERRORS = Counter(
    "sharedsync_operator_agent_call_errors_total", "Failed Agent API calls by call and gRPC code",
    ["call", "code"])
LIVE_AGENTS = Gauge("sharedsync_operator_live_agents", "Agents whose Lease is current")
LEADER = Gauge("sharedsync_operator_leader", "1 while this operator replica is the leader")
STRANDED_PODS_DELETED = Counter(
    "sharedsync_operator_stranded_pods_deleted_total",
    "Pods stranded by a failover deleted for their controller to replace "
    "(strandedPodDeletion), by the kind of that controller and the event's reason "
    "(PodDeletedOnNodeLoss, PodDeletedVolumeMoved)", ["owner_kind", "reason"])
