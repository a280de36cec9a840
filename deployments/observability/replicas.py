"""A model-server replica's engine, as metrics: load, KV cache, prefix cache, throughput,
LoRA adapter slots and loads.

Exported at each health check (every `health_check_period_s`), labelled by pool and
replica. Engine counters are cumulative; `CounterDeltas` turns them into increments.
"""

from __future__ import annotations

from deployments.observability import metrics
from models.outputs import EngineStats


class ReplicaExporter:
    def __init__(self, pool: str, replica: str) -> None:
        self.labels = {"pool": pool, "replica": replica}
        self.deltas = metrics.CounterDeltas()
        metrics.inc("tiered_replica_starts_total", pool=pool)

    def export(self, stats: EngineStats) -> None:
        labels = self.labels
        metrics.set_gauge("tiered_engine_running", stats.num_running, **labels)
        metrics.set_gauge("tiered_engine_waiting", stats.num_waiting, **labels)
        metrics.set_gauge("tiered_kv_blocks_used", stats.kv_blocks_used, **labels)
        metrics.set_gauge("tiered_kv_blocks_capacity", stats.kv_blocks_total, **labels)
        # Per replica, never per adapter: adapter names are unbounded (the ledger has them).
        metrics.set_gauge("tiered_lora_slots_used", stats.lora_slots_used, **labels)
        metrics.set_gauge("tiered_lora_slots_capacity", stats.lora_slots_total, **labels)
        if stats.num_running:
            metrics.observe("tiered_engine_batch_size", stats.last_batch_size, **labels)
        counters = {
            "tiered_prefix_cache_queries_total": stats.prefix_cache_queries,
            "tiered_prefix_cache_hits_total": stats.prefix_cache_hits,
            "tiered_engine_preemptions_total": stats.num_preemptions,
            "tiered_engine_generated_tokens_total": stats.generation_tokens_total,
            "tiered_lora_loads_total": stats.lora_loads_total,
            "tiered_lora_evictions_total": stats.lora_evictions_total,
            "tiered_lora_load_seconds_total": stats.lora_load_seconds_total,
        }
        for name, total in counters.items():
            metrics.inc(name, self.deltas.delta(name, total), **labels)

    def up(self, healthy: bool) -> None:
        metrics.set_gauge("tiered_replica_up", 1.0 if healthy else 0.0, **self.labels)
