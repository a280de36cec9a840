"""The durable state store: one engine, one schema, one migration history (ledger first)."""
