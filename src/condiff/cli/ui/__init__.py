"""``condiff ui``: a local gradio web app over the CLI's runs (docs/ui.md).

``command`` is the typer command (it imports gradio only when it runs); ``app`` builds the gr.Blocks, one
module per tab (``sample_tab``, ``compare_tab``, ``edit_tab``, ``restore_tab``); ``runs`` holds what the tabs run,
without gradio, as `condiff sample`, `edit` and `restore` run it; ``jobs`` runs it in a worker thread, one run at
a time, stoppable."""
