"""Deployment: export a decoder with its compact KV cache (AOTInductor .pt2)."""
