"""lora-run developer tools: the pytest plugin for plugin authors (``testing``) and the recipe-reference
generator (``docgen``: ``python -m lora_run_devtools.docgen``). Neither is needed to train."""
