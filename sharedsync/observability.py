"""Structured logs and the Prometheus endpoint, configured the same way by every component.

Logs go through structlog into the standard library's logging, so that gRPC's, kopf's and our
own records come out in one format: JSON lines in production (``--log-format=json``, the
default when stderr is not a terminal) or a readable console format for people.
"""

import logging
import sys
from typing import Literal

import structlog
from prometheus_client import start_http_server

LogFormat = Literal["json", "console", "auto"]


def configure_logging(level: str = "INFO", fmt: LogFormat = "auto") -> None:
    """Route structlog and stdlib logging to stderr in one format."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # gRPC's Cython layer logs every event-loop lookup at debug level: keep it out.
    logging.getLogger("grpc._cython.cygrpc").setLevel(max(logging.INFO, root.level))
    # The Kubernetes client logs whole request and response bodies at debug level: tokens
    # and Secret data must never reach a log, whatever the level.
    logging.getLogger("kubernetes_asyncio.client.rest").setLevel(logging.WARNING)


def serve_metrics(address: str) -> None:
    """Expose the default Prometheus registry on ``host:port`` (a background thread)."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")  # noqa: S104 - pods scrape us
