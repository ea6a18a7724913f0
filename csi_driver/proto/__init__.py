"""Generated Python bindings for the CSI v1.13.0 API (package ``csi.v1``).

``csi_pb2``/``csi_pb2_grpc`` and their ``.pyi`` stubs are generated from
``csi.proto`` in this directory; do not edit them by hand. Regenerate with
``scripts/gen-protos``.
"""
