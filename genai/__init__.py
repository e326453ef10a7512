"""genai: models, data pipelines and training loops for generative models.

Nothing in this package starts Ray; the training loops run inside Ray Train workers
that `cluster/` launches.
"""

__version__ = "0.1.0"
