"""`tiered chaos`: faults injected under load, and what each one cost, as a table."""
