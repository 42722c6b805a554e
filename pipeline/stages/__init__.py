"""Stage entry points: ``python -m pipeline.stages.<name>`` (what ``dvc.yaml`` runs)."""

STAGES = ("bootstrap", "prepare_prompts", "cache_teacher", "reference_stats", "distill",
          "evaluate", "register")
