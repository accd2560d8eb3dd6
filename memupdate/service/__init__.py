"""The update service: durable jobs, the training worker, one update from request to live,
the recall monitor, Prometheus metrics and the service's settings."""
