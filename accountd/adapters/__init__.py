"""Adapters to the outside world: databases, schema, migrations, the worker HTTP client."""
