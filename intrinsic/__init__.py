"""In-weight edits (FT-L/FT-M, ROME, MEMIT, AlphaEdit): the `weights` strategy (issue 4)."""
