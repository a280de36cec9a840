"""Open-loop arrival processes: when each request of one tenant in one phase is sent.

The schedule is drawn up front from a seeded RNG, so the same scenario and seed send the
same offsets; the runner then sleeps until each one. Offsets are seconds from the phase's
start, in [0, duration).

- constant: every 1/rate s, starting at 0;
- poisson: exponential gaps of mean 1/rate (gamma with shape 1);
- gamma: gaps of mean 1/rate and shape `burstiness` (vLLM's --burstiness: < 1 burstier,
  > 1 more regular than Poisson);
- burst: `size` requests at once at 0, every_s, 2·every_s, ...
"""

from __future__ import annotations

import random

from bench.scenario import Load


def constant(rate: float, duration: float) -> list[float]:
    gap = 1.0 / rate
    n = int(duration * rate - 1e-9) + 1  # offsets 0, gap, ... strictly below duration
    return [i * gap for i in range(n) if i * gap < duration]


def gamma(rate: float, duration: float, rng: random.Random, shape: float = 1.0) -> list[float]:
    """Gaps drawn from Gamma(shape, scale=1/(rate·shape)): mean 1/rate for every shape.
    The first arrival comes after one gap, as a Poisson process's does."""
    scale = 1.0 / (rate * shape)
    out, t = [], rng.gammavariate(shape, scale)
    while t < duration:
        out.append(t)
        t += rng.gammavariate(shape, scale)
    return out


def poisson(rate: float, duration: float, rng: random.Random) -> list[float]:
    return gamma(rate, duration, rng, shape=1.0)


def burst(size: int, every_s: float, duration: float) -> list[float]:
    out, t = [], 0.0
    while t < duration:
        out.extend([t] * size)
        t += every_s
    return out


def schedule(load: Load, duration: float, rng: random.Random) -> list[float]:
    """The send offsets of an open-loop load (closed loops have none: they are paced by
    their own responses)."""
    if load.concurrency is not None:
        raise ValueError("a closed-loop load has no arrival schedule")
    if load.arrival == "burst":
        times = burst(load.burst_size, load.burst_every_s, duration)  # type: ignore[arg-type]
    elif load.arrival == "constant":
        times = constant(load.rate, duration)  # type: ignore[arg-type]
    elif load.arrival == "poisson":
        times = poisson(load.rate, duration, rng)  # type: ignore[arg-type]
    else:
        times = gamma(load.rate, duration, rng, load.burstiness)  # type: ignore[arg-type]
    return times[: load.max_requests] if load.max_requests else times
