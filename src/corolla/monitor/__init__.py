"""``corolla monitor``: a swarm's health page, its state as JSON and Prometheus metrics."""
