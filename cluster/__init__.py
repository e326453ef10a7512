"""cluster: Ray connection, scaling, storage, DeepSpeed configuration and launching.

This is the bottom layer: it imports nothing from `genai`.
"""
