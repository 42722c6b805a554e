"""Stage entry points: ``python -m pipeline.stages.<name>`` (what ``dvc.yaml`` runs)."""

# Stage -> the params sections it reads, in DAG order. dvc.yaml lists the same (a test checks).
# "section.key" is one key of a section (cache_teacher makes pairs only for methods that use them).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "bootstrap": ("world", "scorer"),
    "prepare_prompts": ("prompts",),
    "cache_teacher": ("teacher", "cache", "distill.method"),
    "reference_stats": ("reference",),
    # register.experiment: where a run the training monitor stopped is logged (a FAILED run);
    # cache.precision: the text encoders' precision when the cache encodes on the fly
    "distill": ("teacher", "distill", "register.experiment", "cache.precision"),
    "evaluate": ("teacher", "evaluate"),
    "register": ("register",),
}
STAGES = tuple(STAGE_SECTIONS)
