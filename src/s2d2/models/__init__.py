"""The native network: one decoder for every family's architecture (dense and MoE), its KV caches, and the packed
layout of many rows in one forward."""
