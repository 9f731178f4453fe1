"""Embedded single-machine pool: state store, job queue and runner, REST API (see `flexai serve`)."""
