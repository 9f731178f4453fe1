"""`python -m flexai` is the `flexai` command."""

from flexai.cli.main import app

app(prog_name="flexai")
