"""The sharedsync operator: SyncPolicy and SharedVolume reconciled with kopf.

Layering (as in kopf's own examples): :mod:`.handlers` registers thin kopf handlers;
:mod:`.volumes` and :mod:`.policies` hold the reconcile logic around the pure decisions in
:mod:`sharedsync.core.volume_plan` and :mod:`sharedsync.core.placement`; :mod:`.kube` and
:mod:`.agents` are the only modules that talk to the API server and to agents.
"""
