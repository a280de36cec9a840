"""Alembic environment of the state store (script_location: deployments.state:migrations)."""
