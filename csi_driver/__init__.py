"""The sharedsync CSI plugin: Identity, Controller and Node services over gRPC.

One module per service (``identity``, ``controller``, ``node``), each validating its request
before doing anything, raising ``sharedsync.core.errors`` types that ``status`` maps to gRPC
codes. ``server`` assembles the services a process serves; ``cli`` is the entry point.
"""
