"""Pure-torch model definitions; nothing here knows about Ray or DeepSpeed."""

from genai.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
