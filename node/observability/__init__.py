"""Operations: Prometheus metrics and health/readiness checks of every role."""
