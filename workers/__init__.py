"""esm-workers: Lambda-style event source mappings on your own Kafka, RabbitMQ and Redis."""

from workers.engine.outcomes import RetryableError, Throttled

__version__ = "0.1.0"
__all__ = ["RetryableError", "Throttled", "__version__"]
