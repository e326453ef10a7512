"""Quality metrics for generated images: a small digit classifier, its feature-space Frechet distance and
label agreement (genai.eval.digits)."""
