"""Data with exact answers: the GMM oracle, procedural shapes with a deterministic labeller, digits."""
