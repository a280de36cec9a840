"""Revisions of the state schema, oldest first. Never edit one that has shipped."""
