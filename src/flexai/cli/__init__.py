"""The `flexai` command."""
