"""The shared library every stage uses: config + CLI, model loading, templates and exact tokenization, the one loss, checkpoints, run scaffolding, reporting."""
