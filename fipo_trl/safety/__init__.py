"""The run-safety layer: everything that keeps a FIPO run from losing work, hanging or training silently wrong,
apart from the method itself. Its contract (what survives a kill, what a complete checkpoint is, when a resume
refuses, what the lock guarantees, what is never deleted) is in README.md beside this file."""
