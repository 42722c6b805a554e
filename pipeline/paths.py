"""Every path the pipeline reads or writes, relative to the project root, written once."""

from __future__ import annotations

from pathlib import Path

WORLD = Path("data/world")
TEACHER = Path("models/teacher")
SCORER = Path("models/scorer")
PROMPTS = Path("data/prompts")
CACHE = Path("data/cache")
PAIRS = Path("data/pairs")
REFSTATS = Path("data/refstats")
STUDENT = Path("models/student")
CHECKPOINTS = Path("checkpoints/distill")
DISTILL_OUT = Path("outputs/distill")
MONITOR_FILE = "monitor.json"  # in DISTILL_OUT: the training monitor's flags
EVAL_OUT = Path("outputs/eval")
REGISTER_OUT = Path("outputs/register.json")
REVIEW_OUT = Path("outputs/review")  # the review page of the version last registered
METRICS = Path("metrics")
PLOTS = Path("plots")
TOOL_CACHE = Path(".cache")

TRAIN_PROMPTS = PROMPTS / "train.txt"
EVAL_CAPTIONS = PROMPTS / "eval.json"
PROMPTS_MANIFEST = PROMPTS / "manifest.json"
BOOTSTRAP_METRICS = METRICS / "bootstrap.json"
DISTILL_METRICS = METRICS / "distill.json"
EVAL_METRICS = METRICS / "eval.json"
LOSS_PLOT = PLOTS / "distill_loss.csv"
PROXY_FID_PLOT = PLOTS / "distill_fid.csv"
