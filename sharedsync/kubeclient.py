"""One way to reach the Kubernetes API: a kubeconfig file when given, the pod's service account
otherwise. Every component (agent, operator, CSI controller) builds its client here."""

from pathlib import Path

from kubernetes_asyncio import client, config

#: Connections a client keeps to the API server at most (kubernetes-asyncio's default is 100).
#: Each TLS connection costs about 300 KiB (asyncio's 256 KiB read buffer and OpenSSL's);
#: requests beyond this wait for a free one, which the API server answers in milliseconds.
#: Measured with 200 volumes, 16 instead of 8 cost the operator 14 MiB more at its peak.
MAX_CONNECTIONS = 8


async def api_client(kubeconfig: Path | None = None) -> client.ApiClient:
    """A client for ``kubeconfig``, or in-cluster credentials when it is None.

    The caller owns the client and must ``await client.close()``.
    """
    configuration = client.Configuration()
    configuration.connection_pool_maxsize = MAX_CONNECTIONS
    if kubeconfig is not None:
        # persist_config=False: never write refreshed credentials back into the user's file
        await config.load_kube_config(config_file=str(kubeconfig),
                                      client_configuration=configuration, persist_config=False)
    else:
        config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
    return client.ApiClient(configuration)
