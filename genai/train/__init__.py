"""Training loops that run inside Ray Train workers, and the pieces they share."""
