"""HTTP layer: routes, schemas, error mapping. Thin over app.service."""
