"""Kubernetes adapters: device plugin (agent), scheduler extender, admission webhook, inventory sync."""
