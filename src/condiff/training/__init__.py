"""Training: per-sample objectives, time samplers and weightings, conditioning dropout, recipes, the Trainer."""
