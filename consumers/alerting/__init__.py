"""Alerting: the consumer of the alerts topic and the sinks it routes alerts to (paging, the stop switch)."""
