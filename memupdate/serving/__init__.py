"""Serving: the adapter registry, vLLM processes and clients, backends, probes, resolver plugin."""
