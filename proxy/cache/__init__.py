"""Cache layer: aiocache store (memory or Redis), single-flight, shared in-flight bodies."""
