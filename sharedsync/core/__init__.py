"""Pure logic shared by every component: no I/O, no imports of our other packages.

Everything here is deterministic and exhaustively unit- and property-tested; the adapters
(gRPC, Kubernetes, filesystem, network) call into it.
"""
