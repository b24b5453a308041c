"""Forming batches: the shared window, grouping, the combined prompt and its parser, the sender."""
