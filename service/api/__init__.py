"""HTTP API routers (``/v1``), authentication, problem+json errors, health and metrics."""
